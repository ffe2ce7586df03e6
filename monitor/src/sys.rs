//! Every call into libc or the kernel that needs `unsafe`, fenced in one place.

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions};

/// Most iovecs one `process_vm_readv` call takes (Linux's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Maps `len` bytes of `file` at `offset` read-only and shared.
///
/// The caller must accept that if the file is truncated under the mapping,
/// touching the lost part raises SIGBUS; QEMU never shrinks a RAM backend
/// while the guest runs.
pub fn map_readonly(file: &File, offset: u64, len: usize) -> io::Result<Mmap> {
    // SAFETY: the mapping is read-only and private to this process, so no
    // Rust reference into it is ever aliased by a writer in this process. The
    // guest (through QEMU) writes the pages concurrently: readers copy bytes
    // out of the mapping and never hold references across reads or assume the
    // contents are stable, which is all a shared mapping of foreign memory can
    // promise. Truncation (SIGBUS) is documented above.
    unsafe { MmapOptions::new().offset(offset).len(len).map(file) }
}

/// Reads remote ranges `(address, length)` of process `pid` into `local`,
/// in order, with one `process_vm_readv` call. Returns the bytes read, which
/// is less than asked for when a remote range is not mapped.
pub fn process_vm_read(
    pid: i32,
    local: &mut [&mut [u8]],
    remote: &[(u64, usize)],
) -> io::Result<usize> {
    if local.len() > MAX_IOVECS || remote.len() > MAX_IOVECS {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "more iovecs than UIO_MAXIOV"));
    }
    let local_iov: Vec<libc::iovec> = local
        .iter_mut()
        .map(|b| libc::iovec { iov_base: b.as_mut_ptr().cast(), iov_len: b.len() })
        .collect();
    let mut remote_iov = Vec::with_capacity(remote.len());
    for &(addr, len) in remote {
        let base = usize::try_from(addr)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "remote address"))?;
        remote_iov.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len });
    }
    // SAFETY: every local iovec points into a live `&mut [u8]` of exactly its
    // length, borrowed mutably for the duration of the call, so the kernel
    // writes only memory we own. Remote iovecs are only addresses in the other
    // process; the kernel checks them. Counts fit in c_ulong (<= UIO_MAXIOV).
    let n = unsafe {
        libc::process_vm_readv(
            pid,
            local_iov.as_ptr(),
            local_iov.len() as libc::c_ulong,
            remote_iov.as_ptr(),
            remote_iov.len() as libc::c_ulong,
            0,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, clippy::cast_possible_wrap, clippy::type_complexity)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn reads_own_memory_in_batches() {
        let a: Vec<u8> = (0..=255).collect();
        let b = vec![7u8; 4096];
        let mut x = vec![0u8; 256];
        let mut y = vec![0u8; 4096];
        let remote = [(a.as_ptr() as u64, a.len()), (b.as_ptr() as u64, b.len())];
        let n = process_vm_read(std::process::id() as i32, &mut [&mut x, &mut y], &remote).unwrap();
        assert_eq!(n, 256 + 4096);
        assert_eq!(x, a);
        assert_eq!(y, b);
    }

    #[test]
    fn unmapped_remote_address_is_an_error_or_short() {
        let mut x = vec![0u8; 16];
        let r = process_vm_read(std::process::id() as i32, &mut [&mut x], &[(8, 16)]);
        assert!(r.is_err() || r.unwrap() < 16);
    }

    #[test]
    fn maps_a_file_read_only() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[1u8; 8192]).unwrap();
        let m = map_readonly(&f, 4096, 4096).unwrap();
        assert_eq!(m.len(), 4096);
        assert!(m.iter().all(|&b| b == 1));
    }
}
