//! The allocator settings of the process (issue 11), glibc only: glibc's malloc keeps what
//! the relay frees. A 30 MiB message freed from a thread arena stays in the process, since
//! the default mmap threshold rises up to 32 MiB after the first large buffer is freed (RSS
//! 6.4x its start 10 s after 8 pairs relayed 30 MiB each way); and the small allocations of
//! sockets that closed stay in the arenas until trimmed (`relay_module::ops::memory`).

/// Allocations at least this large, bytes, always get their own mapping, unmapped when
/// freed (glibc `M_MMAP_THRESHOLD`; 128 KiB is glibc's starting value, here kept fixed).
pub const MMAP_THRESHOLD_BYTES: i32 = 128 << 10;

/// Fixes the mmap threshold at [`MMAP_THRESHOLD_BYTES`]; returns whether the allocator took
/// it (false off glibc).
pub fn tune_allocator() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator parameter.
        unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// Hands the free pages inside the allocator's arenas back to the OS (glibc
/// `malloc_trim(0)`); returns whether any memory was released (false off glibc).
pub fn trim() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes the allocator's own locks.
        unsafe { libc::malloc_trim(0) == 1 }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_fixed_mmap_threshold() {
        assert!(tune_allocator());
    }
}
