//! One accepted WebSocket after its 101: the reader and writer tasks that own the stream
//! ([`conn`]), the bounded outbound queue every other socket writes into ([`outbox`]), and
//! the process-wide budget for partly received messages with its frame-header tracker
//! ([`ingress`]).

pub mod conn;
pub mod ingress;
pub mod outbox;
