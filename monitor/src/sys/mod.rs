//! Every call into libc or the kernel that needs `unsafe`, fenced in one place.

pub mod virt;

use std::fs::File;
use std::io;

use memmap2::{Mmap, MmapOptions};

/// Most iovecs one `process_vm_readv` call takes (Linux's `UIO_MAXIOV`).
pub const MAX_IOVECS: usize = 1024;

/// Time since the host booted, time suspended included (`CLOCK_BOOTTIME`):
/// the clock that start times in `/proc/PID/stat` count in. Asked of the
/// kernel directly, as a confined daemon may not read `/proc/uptime`.
pub fn since_boot() -> Option<std::time::Duration> {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    let secs = u64::try_from(ts.tv_sec).ok()?;
    let nanos = u32::try_from(ts.tv_nsec).ok()?;
    (r == 0).then(|| std::time::Duration::new(secs, nanos))
}

/// Clock ticks a second in `/proc` (`USER_HZ`).
pub fn clock_ticks() -> Option<u64> {
    // SAFETY: sysconf only reads a constant of the C library.
    let n = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(n).ok().filter(|&n| n > 0)
}

/// Maps `len` bytes of `file` at `offset` read-only and shared.
///
/// The caller must accept that if the file is truncated under the mapping,
/// touching the lost part raises SIGBUS; QEMU never shrinks a RAM backend
/// while the guest runs.
pub fn map_readonly(file: &File, offset: u64, len: usize) -> io::Result<Mmap> {
    // SAFETY: the mapping is read-only and private to this process, so no
    // Rust reference into it is ever aliased by a writer in this process. The
    // guest (through QEMU) writes the pages concurrently: readers copy bytes
    // out of the mapping, or hash a page in place (`GuestMemory::slice`,
    // reading each byte once), and never assume the contents are stable or
    // hold them across reads, which is all a shared mapping of foreign memory
    // can promise. Truncation (SIGBUS) is documented above.
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
    // Remote ranges that follow one another become one iovec: the kernel
    // pins and copies a long range much faster than many pages.
    let mut remote_iov: Vec<libc::iovec> = Vec::with_capacity(remote.len());
    for &(addr, len) in remote {
        let base = usize::try_from(addr)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "remote address"))?;
        match remote_iov.last_mut() {
            Some(last) if (last.iov_base as usize).checked_add(last.iov_len) == Some(base) => {
                last.iov_len += len;
            }
            _ => remote_iov.push(libc::iovec { iov_base: base as *mut libc::c_void, iov_len: len }),
        }
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
    #[test]
    fn lifecycle_events_say_why() {
        use super::virt as v;
        let ev = |e, d| super::lifecycle(e, d, "u".into(), "n".into());
        let why = |e: Option<super::DomainEvent>| match e {
            Some(
                super::DomainEvent::Stopped { why, .. }
                | super::DomainEvent::Paused { why, .. }
                | super::DomainEvent::Resumed { why, .. },
            ) => why,
            other => panic!("{other:?}"),
        };
        assert!(matches!(
            ev(v::VIR_DOMAIN_EVENT_STARTED, 1),
            Some(super::DomainEvent::Started { .. })
        ));
        assert_eq!(
            why(ev(v::VIR_DOMAIN_EVENT_STOPPED, v::VIR_DOMAIN_EVENT_STOPPED_MIGRATED)),
            "the domain migrated to another host"
        );
        assert_eq!(why(ev(v::VIR_DOMAIN_EVENT_STOPPED, 99)), "the domain stopped");
        assert_eq!(why(ev(v::VIR_DOMAIN_EVENT_UNDEFINED, 0)), "the domain was undefined");
        assert_eq!(
            why(ev(v::VIR_DOMAIN_EVENT_SUSPENDED, v::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED)),
            "paused for the end of a migration"
        );
        assert_eq!(why(ev(v::VIR_DOMAIN_EVENT_RESUMED, 0)), "resumed");
        assert_eq!(ev(v::VIR_DOMAIN_EVENT_DEFINED, 0), None);
        assert_eq!(ev(v::VIR_DOMAIN_EVENT_CRASHED, 0), None);
    }

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
    fn adjacent_remote_ranges_land_in_their_own_buffers() {
        let a: Vec<u8> = (0..=255).cycle().take(3 * 4096).collect();
        let base = a.as_ptr() as u64;
        // Three adjacent pages and one out of order, into four buffers.
        let remote = [(base, 4096), (base + 4096, 4096), (base + 8192, 4096), (base, 16)];
        let (mut p, mut q, mut r, mut s) =
            (vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 4096], vec![0u8; 16]);
        let n = process_vm_read(
            std::process::id() as i32,
            &mut [&mut p, &mut q, &mut r, &mut s],
            &remote,
        )
        .unwrap();
        assert_eq!(n, 3 * 4096 + 16);
        assert_eq!(
            (&p[..], &q[..], &r[..], &s[..]),
            (&a[..4096], &a[4096..8192], &a[8192..], &a[..16])
        );
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

/// A domain lifecycle change, as libvirt's event loop reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DomainEvent {
    Started {
        uuid: String,
        name: String,
    },
    /// Stopped or undefined; `why` says how, for the detached event.
    Stopped {
        uuid: String,
        name: String,
        why: &'static str,
    },
    Rebooted {
        uuid: String,
        name: String,
    },
    /// Paused (its vCPUs stop; its memory stays readable); `why` says by what.
    Paused {
        uuid: String,
        name: String,
        why: &'static str,
    },
    Resumed {
        uuid: String,
        name: String,
        why: &'static str,
    },
}

/// The lifecycle events the daemon acts on, from libvirt's event and
/// detail numbers (`virDomainEventType` and its detail enums).
pub fn lifecycle(event: u32, detail: u32, uuid: String, name: String) -> Option<DomainEvent> {
    use self::virt as v;
    Some(match event {
        v::VIR_DOMAIN_EVENT_STARTED => DomainEvent::Started { uuid, name },
        v::VIR_DOMAIN_EVENT_STOPPED => {
            let why = match detail {
                v::VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN => "the domain shut down",
                v::VIR_DOMAIN_EVENT_STOPPED_DESTROYED => "the domain was destroyed",
                v::VIR_DOMAIN_EVENT_STOPPED_CRASHED => "the domain crashed",
                v::VIR_DOMAIN_EVENT_STOPPED_MIGRATED => "the domain migrated to another host",
                v::VIR_DOMAIN_EVENT_STOPPED_SAVED => "the domain was saved to a file",
                v::VIR_DOMAIN_EVENT_STOPPED_FAILED => "the domain failed (its emulator ended)",
                _ => "the domain stopped",
            };
            DomainEvent::Stopped { uuid, name, why }
        }
        v::VIR_DOMAIN_EVENT_UNDEFINED => {
            DomainEvent::Stopped { uuid, name, why: "the domain was undefined" }
        }
        v::VIR_DOMAIN_EVENT_SUSPENDED => {
            let why = match detail {
                v::VIR_DOMAIN_EVENT_SUSPENDED_PAUSED => "paused by request",
                v::VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED => "paused for the end of a migration",
                v::VIR_DOMAIN_EVENT_SUSPENDED_IOERROR => "paused on a disk I/O error",
                v::VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG => "paused by its watchdog",
                v::VIR_DOMAIN_EVENT_SUSPENDED_RESTORED => "paused after a restore",
                v::VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT => "paused from a snapshot",
                v::VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR => "paused on a libvirt error",
                v::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY => "paused for a post-copy migration",
                v::VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED => {
                    "paused: its post-copy migration failed"
                }
                _ => "paused",
            };
            DomainEvent::Paused { uuid, name, why }
        }
        v::VIR_DOMAIN_EVENT_RESUMED => {
            let why = match detail {
                v::VIR_DOMAIN_EVENT_RESUMED_MIGRATED => "resumed after a migration",
                v::VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT => "resumed from a snapshot",
                v::VIR_DOMAIN_EVENT_RESUMED_POSTCOPY => {
                    "resumed, its migration's post-copy running"
                }
                _ => "resumed",
            };
            DomainEvent::Resumed { uuid, name, why }
        }
        _ => return None,
    })
}

type EventSender = tokio::sync::mpsc::UnboundedSender<DomainEvent>;

unsafe extern "C" fn lifecycle_cb(
    _conn: *mut libc::c_void,
    dom: *mut libc::c_void,
    event: libc::c_int,
    detail: libc::c_int,
    opaque: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: libvirt passes a valid domain for the duration of the callback.
    let (uuid, name) = unsafe { virt::lent_domain_ids(dom) };
    // SAFETY: `opaque` is the Box<EventSender> leaked at registration, alive
    // until libvirt calls `free_sender` after deregistration.
    let tx = unsafe { &*(opaque as *const EventSender) };
    let (Ok(event), Ok(detail)) = (u32::try_from(event), u32::try_from(detail)) else { return 0 };
    if let Some(m) = lifecycle(event, detail, uuid, name) {
        let _ = tx.send(m);
    }
    0
}

unsafe extern "C" fn reboot_cb(
    _conn: *mut libc::c_void,
    dom: *mut libc::c_void,
    opaque: *mut libc::c_void,
) {
    // SAFETY: as in `lifecycle_cb`.
    let (uuid, name) = unsafe { virt::lent_domain_ids(dom) };
    // SAFETY: as in `lifecycle_cb`.
    let tx = unsafe { &*(opaque as *const EventSender) };
    let _ = tx.send(DomainEvent::Rebooted { uuid, name });
}

unsafe extern "C" fn free_sender(opaque: *mut libc::c_void) {
    // SAFETY: `opaque` came from Box::into_raw in `register_domain_events`
    // and libvirt calls this exactly once.
    drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
}

/// Registers lifecycle and reboot callbacks for every domain of `conn`,
/// sending what they see to `tx`. Needs libvirt's default event loop
/// registered before `conn` was opened and run on some thread. The
/// registrations end when the connection closes.
pub fn register_domain_events(conn: &virt::Connection, tx: EventSender) -> Result<(), String> {
    type Lifecycle = unsafe extern "C" fn(
        *mut libc::c_void,
        *mut libc::c_void,
        libc::c_int,
        libc::c_int,
        *mut libc::c_void,
    ) -> libc::c_int;
    for (id, cb) in [
        // SAFETY: libvirt calls a callback registered for an event ID with that
        // ID's own signature; the generic type is only how the C API spells
        // the parameter (its VIR_DOMAIN_EVENT_CALLBACK macro casts the same way).
        (virt::VIR_DOMAIN_EVENT_ID_LIFECYCLE, unsafe {
            std::mem::transmute::<Lifecycle, virt::GenericCallback>(lifecycle_cb)
        }),
        (virt::VIR_DOMAIN_EVENT_ID_REBOOT, reboot_cb as virt::GenericCallback),
    ] {
        let opaque = Box::into_raw(Box::new(tx.clone())).cast::<libc::c_void>();
        // SAFETY: the callbacks have the signatures of their event IDs (above);
        // `opaque` stays valid until libvirt calls `free_sender`.
        if let Err(e) = unsafe { conn.register_event(id, cb, opaque, free_sender) } {
            // SAFETY: registration failed, so libvirt will never free it.
            drop(unsafe { Box::from_raw(opaque as *mut EventSender) });
            return Err(e.to_string());
        }
    }
    Ok(())
}

/// The host's name, from uname(2): unlike `/proc/sys/kernel/hostname` it
/// needs no more of /proc than the unit's `ProcSubset=pid` leaves.
pub fn hostname() -> Option<String> {
    // SAFETY: utsname is plain old data, for which all zeroes is a valid value.
    let mut uts: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: uname writes only into the struct it is given.
    if unsafe { libc::uname(&raw mut uts) } != 0 {
        return None;
    }
    let bytes: Vec<u8> =
        uts.nodename.iter().take_while(|&&c| c != 0).map(|&c| c.cast_unsigned()).collect();
    String::from_utf8(bytes).ok().filter(|h| !h.is_empty())
}
