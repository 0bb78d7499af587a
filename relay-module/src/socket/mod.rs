//! One accepted WebSocket after its 101: the reader and writer tasks that own the stream
//! ([`conn`]) and the bounded outbound queue every other socket writes into ([`outbox`]).

pub mod conn;
pub mod outbox;
