//! libvirt's C API, loaded when first used (`libvirt.so.0`, and
//! `libvirt-qemu.so.0` for the QEMU monitor passthrough) rather than linked:
//! vigil builds, and its tests that need no hypervisor run, on a machine
//! without libvirt; the daemon and the CLI need the library only once they
//! talk to a hypervisor, and say so by name if it is missing.
//!
//! Only what vigil asks of libvirt is bound, with safe wrappers: open a
//! connection, list and look up domains, their state, memory size, QEMU
//! monitor commands, a memory dump, lifecycle and reboot events, and the
//! domain statistics that carry KVM's own counters.

use std::ffi::{CStr, CString, c_char, c_int, c_uint, c_ulong, c_ushort, c_void};
use std::sync::OnceLock;

type ConnPtr = *mut c_void;
type DomPtr = *mut c_void;

/// libvirt's `virConnectDomainEventGenericCallback`.
pub(super) type GenericCallback = unsafe extern "C" fn(ConnPtr, DomPtr, *mut c_void);
/// libvirt's `virFreeCallback`.
pub(super) type FreeCallback = unsafe extern "C" fn(*mut c_void);
type ErrorFunc = unsafe extern "C" fn(*mut c_void, *mut RawError);

/// The head of libvirt's `virError`: only these fields are read.
#[repr(C)]
struct RawError {
    code: c_int,
    _domain: c_int,
    message: *mut c_char,
}

/// libvirt's `virDomainInfo`.
#[repr(C)]
#[derive(Default)]
struct DomainInfo {
    _state: u8,
    max_mem: c_ulong,
    _memory: c_ulong,
    _nr_virt_cpu: c_ushort,
    _cpu_time: u64,
}

/// libvirt's `virTypedParameter`: a named value of one of six types.
#[repr(C)]
pub(crate) struct RawTypedParam {
    field: [c_char; TYPED_PARAM_FIELD_LENGTH],
    kind: c_int,
    value: RawTypedValue,
}

/// `VIR_TYPED_PARAM_FIELD_LENGTH`: a name's bytes, its NUL among them.
const TYPED_PARAM_FIELD_LENGTH: usize = 80;

/// The value of a `virTypedParameter`, read as its `type` says.
#[repr(C)]
#[derive(Clone, Copy)]
union RawTypedValue {
    i: c_int,
    ui: c_uint,
    l: i64,
    ul: u64,
    d: f64,
    b: c_char,
    s: *mut c_char,
}

/// libvirt's `virDomainStatsRecord`: one domain's statistics.
#[repr(C)]
struct RawStatsRecord {
    dom: DomPtr,
    params: *mut RawTypedParam,
    nparams: c_int,
}

/// The value of one statistic libvirt gives.
#[derive(Debug, Clone, PartialEq)]
pub enum TypedValue {
    Int(i64),
    UInt(u64),
    Double(f64),
    Bool(bool),
    Str(String),
}

/// One domain's statistics, by libvirt's dotted names (`vcpu.0.exits.sum`).
#[derive(Debug, Clone, PartialEq)]
pub struct DomainStats {
    pub uuid: String,
    pub name: String,
    pub params: Vec<(String, TypedValue)>,
}

/// Statistics groups (`virDomainStatsTypes`): per-vCPU ones, KVM's among
/// them when QEMU has them (libvirt 8.9 on), and the per-VM ones of KVM
/// (libvirt 8.9 on; an older libvirt leaves out what it does not know).
pub const VIR_DOMAIN_STATS_VCPU: u32 = 1 << 3;
pub const VIR_DOMAIN_STATS_VM: u32 = 1 << 10;
/// `VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT`: a domain whose QEMU is busy
/// with another job gives what it can without waiting for it.
pub const VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT: u32 = 1 << 29;

/// A typed parameter's name and value; `None` for a type libvirt did not
/// have when this was written. A name without its NUL within the field is
/// cut at the field's end.
///
/// # Safety
/// A parameter of type string must hold a NUL-terminated string or null.
pub(crate) unsafe fn typed_param(p: &RawTypedParam) -> Option<(String, TypedValue)> {
    let bytes: Vec<u8> = p
        .field
        .iter()
        .map(|c| u8::from_ne_bytes(c.to_ne_bytes()))
        .take_while(|&c| c != 0)
        .collect();
    let name = String::from_utf8_lossy(&bytes).into_owned();
    let v = p.value;
    // SAFETY: each arm reads the union member libvirt wrote for that type.
    let value = unsafe {
        match p.kind {
            1 => TypedValue::Int(i64::from(v.i)),
            2 => TypedValue::UInt(u64::from(v.ui)),
            3 => TypedValue::Int(v.l),
            4 => TypedValue::UInt(v.ul),
            5 => TypedValue::Double(v.d),
            6 => TypedValue::Bool(v.b != 0),
            7 if v.s.is_null() => TypedValue::Str(String::new()),
            // NUL-terminated (caller's contract); copied at once.
            7 => TypedValue::Str(CStr::from_ptr(v.s).to_string_lossy().into_owned()),
            _ => return None,
        }
    };
    Some((name, value))
}

pub const VIR_CONNECT_LIST_DOMAINS_ACTIVE: u32 = 1;
pub const VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP: u32 = 1;
pub const VIR_DOMAIN_CORE_DUMP_FORMAT_RAW: u32 = 0;
pub const VIR_DUMP_MEMORY_ONLY: u32 = 16;
pub const VIR_DOMAIN_EVENT_ID_LIFECYCLE: c_int = 0;
pub const VIR_DOMAIN_EVENT_ID_REBOOT: c_int = 1;
/// `VIR_ERR_NO_DOMAIN`.
pub const ERR_NO_DOMAIN: i32 = 42;
/// `VIR_ERR_INVALID_ARG` (a UUID lookup of something not a UUID).
pub const ERR_INVALID_ARG: i32 = 8;
/// vigil's code for "the library could not be loaded" (libvirt's are >= 0).
pub const ERR_NOT_LOADED: i32 = -1;
/// vigil's code for an argument libvirt cannot be given (a NUL byte in it).
pub const ERR_ARGUMENT: i32 = -2;

/// A domain's state (`virDomainState`).
pub const VIR_DOMAIN_NOSTATE: i32 = 0;
pub const VIR_DOMAIN_RUNNING: i32 = 1;
pub const VIR_DOMAIN_BLOCKED: i32 = 2;
pub const VIR_DOMAIN_PAUSED: i32 = 3;
pub const VIR_DOMAIN_SHUTDOWN: i32 = 4;
pub const VIR_DOMAIN_SHUTOFF: i32 = 5;
pub const VIR_DOMAIN_CRASHED: i32 = 6;
pub const VIR_DOMAIN_PMSUSPENDED: i32 = 7;

/// Lifecycle events (`virDomainEventType`) and the details the daemon tells apart.
#[cfg(test)]
pub const VIR_DOMAIN_EVENT_DEFINED: u32 = 0;
pub const VIR_DOMAIN_EVENT_UNDEFINED: u32 = 1;
pub const VIR_DOMAIN_EVENT_STARTED: u32 = 2;
pub const VIR_DOMAIN_EVENT_SUSPENDED: u32 = 3;
pub const VIR_DOMAIN_EVENT_RESUMED: u32 = 4;
pub const VIR_DOMAIN_EVENT_STOPPED: u32 = 5;
#[cfg(test)]
pub const VIR_DOMAIN_EVENT_CRASHED: u32 = 8;
pub const VIR_DOMAIN_EVENT_SUSPENDED_PAUSED: u32 = 0;
pub const VIR_DOMAIN_EVENT_SUSPENDED_MIGRATED: u32 = 1;
pub const VIR_DOMAIN_EVENT_SUSPENDED_IOERROR: u32 = 2;
pub const VIR_DOMAIN_EVENT_SUSPENDED_WATCHDOG: u32 = 3;
pub const VIR_DOMAIN_EVENT_SUSPENDED_RESTORED: u32 = 4;
pub const VIR_DOMAIN_EVENT_SUSPENDED_FROM_SNAPSHOT: u32 = 5;
pub const VIR_DOMAIN_EVENT_SUSPENDED_API_ERROR: u32 = 6;
pub const VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY: u32 = 7;
pub const VIR_DOMAIN_EVENT_SUSPENDED_POSTCOPY_FAILED: u32 = 8;
pub const VIR_DOMAIN_EVENT_RESUMED_MIGRATED: u32 = 1;
pub const VIR_DOMAIN_EVENT_RESUMED_FROM_SNAPSHOT: u32 = 2;
pub const VIR_DOMAIN_EVENT_RESUMED_POSTCOPY: u32 = 3;
pub const VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN: u32 = 0;
pub const VIR_DOMAIN_EVENT_STOPPED_DESTROYED: u32 = 1;
pub const VIR_DOMAIN_EVENT_STOPPED_CRASHED: u32 = 2;
pub const VIR_DOMAIN_EVENT_STOPPED_MIGRATED: u32 = 3;
pub const VIR_DOMAIN_EVENT_STOPPED_SAVED: u32 = 4;
pub const VIR_DOMAIN_EVENT_STOPPED_FAILED: u32 = 5;

/// The functions vigil calls, resolved from the loaded libraries.
struct Api {
    connect_open: unsafe extern "C" fn(*const c_char) -> ConnPtr,
    connect_close: unsafe extern "C" fn(ConnPtr) -> c_int,
    connect_set_keep_alive: unsafe extern "C" fn(ConnPtr, c_int, c_uint) -> c_int,
    connect_is_alive: unsafe extern "C" fn(ConnPtr) -> c_int,
    connect_list_all_domains: unsafe extern "C" fn(ConnPtr, *mut *mut DomPtr, c_uint) -> c_int,
    domain_list_get_stats:
        unsafe extern "C" fn(*mut DomPtr, c_uint, *mut *mut *mut RawStatsRecord, c_uint) -> c_int,
    domain_stats_record_list_free: unsafe extern "C" fn(*mut *mut RawStatsRecord),
    connect_domain_event_register_any: unsafe extern "C" fn(
        ConnPtr,
        DomPtr,
        c_int,
        Option<GenericCallback>,
        *mut c_void,
        Option<FreeCallback>,
    ) -> c_int,
    domain_lookup_by_name: unsafe extern "C" fn(ConnPtr, *const c_char) -> DomPtr,
    domain_lookup_by_uuid_string: unsafe extern "C" fn(ConnPtr, *const c_char) -> DomPtr,
    domain_free: unsafe extern "C" fn(DomPtr) -> c_int,
    domain_get_name: unsafe extern "C" fn(DomPtr) -> *const c_char,
    domain_get_uuid_string: unsafe extern "C" fn(DomPtr, *mut c_char) -> c_int,
    domain_get_state: unsafe extern "C" fn(DomPtr, *mut c_int, *mut c_int, c_uint) -> c_int,
    domain_is_active: unsafe extern "C" fn(DomPtr) -> c_int,
    domain_get_info: unsafe extern "C" fn(DomPtr, *mut DomainInfo) -> c_int,
    domain_core_dump_with_format:
        unsafe extern "C" fn(DomPtr, *const c_char, c_uint, c_uint) -> c_int,
    domain_qemu_monitor_command:
        unsafe extern "C" fn(DomPtr, *const c_char, *mut *mut c_char, c_uint) -> c_int,
    event_register_default_impl: unsafe extern "C" fn() -> c_int,
    event_run_default_impl: unsafe extern "C" fn() -> c_int,
    set_error_func: unsafe extern "C" fn(*mut c_void, Option<ErrorFunc>),
    get_last_error: unsafe extern "C" fn() -> *mut RawError,
}

/// The libraries, opened once; why not, if they could not be.
fn api() -> Result<&'static Api, VirError> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load)
        .as_ref()
        .map_err(|why| VirError { code: ERR_NOT_LOADED, message: why.clone() })
}

/// Opens `name` for good (the handle is never closed: the functions stay in use).
fn open(name: &CStr) -> Result<*mut c_void, String> {
    // SAFETY: dlopen with a NUL-terminated name; libvirt's initialisers
    // are what any program linked against it runs too.
    let h = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if h.is_null() {
        // SAFETY: dlerror returns a NUL-terminated string or null.
        let why = unsafe { libc::dlerror() };
        let why = if why.is_null() {
            String::new()
        } else {
            // SAFETY: non-null, NUL-terminated (above); copied at once.
            unsafe { CStr::from_ptr(why) }.to_string_lossy().into_owned()
        };
        return Err(format!(
            "cannot load {} ({why}): install libvirt (Debian: libvirt0)",
            name.to_string_lossy()
        ));
    }
    Ok(h)
}

/// A symbol's address as the function pointer type `T`.
///
/// # Safety
/// `T` must be an `extern "C"` function pointer type with the symbol's signature.
unsafe fn as_fn<T: Copy>(p: *mut c_void) -> T {
    assert_eq!(std::mem::size_of::<T>(), std::mem::size_of::<*mut c_void>());
    // SAFETY: same size (above); the type is the symbol's (caller's contract).
    unsafe { std::mem::transmute_copy(&p) }
}

fn load() -> Result<Api, String> {
    let lib = open(c"libvirt.so.0")?;
    let qemu = open(c"libvirt-qemu.so.0")?;
    macro_rules! sym {
        ($h:expr, $name:literal) => {{
            // SAFETY: a NUL-terminated symbol name looked up in a handle dlopen gave.
            let p = unsafe { libc::dlsym($h, concat!($name, "\0").as_ptr().cast()) };
            if p.is_null() {
                return Err(format!("libvirt has no {}: too old a libvirt", $name));
            }
            // SAFETY: the symbol is libvirt's function of that name, whose C
            // signature the field's type spells (libvirt's public headers).
            unsafe { as_fn(p) }
        }};
    }
    Ok(Api {
        connect_open: sym!(lib, "virConnectOpen"),
        connect_close: sym!(lib, "virConnectClose"),
        connect_set_keep_alive: sym!(lib, "virConnectSetKeepAlive"),
        connect_is_alive: sym!(lib, "virConnectIsAlive"),
        connect_list_all_domains: sym!(lib, "virConnectListAllDomains"),
        domain_list_get_stats: sym!(lib, "virDomainListGetStats"),
        domain_stats_record_list_free: sym!(lib, "virDomainStatsRecordListFree"),
        connect_domain_event_register_any: sym!(lib, "virConnectDomainEventRegisterAny"),
        domain_lookup_by_name: sym!(lib, "virDomainLookupByName"),
        domain_lookup_by_uuid_string: sym!(lib, "virDomainLookupByUUIDString"),
        domain_free: sym!(lib, "virDomainFree"),
        domain_get_name: sym!(lib, "virDomainGetName"),
        domain_get_uuid_string: sym!(lib, "virDomainGetUUIDString"),
        domain_get_state: sym!(lib, "virDomainGetState"),
        domain_is_active: sym!(lib, "virDomainIsActive"),
        domain_get_info: sym!(lib, "virDomainGetInfo"),
        domain_core_dump_with_format: sym!(lib, "virDomainCoreDumpWithFormat"),
        domain_qemu_monitor_command: sym!(qemu, "virDomainQemuMonitorCommand"),
        event_register_default_impl: sym!(lib, "virEventRegisterDefaultImpl"),
        event_run_default_impl: sym!(lib, "virEventRunDefaultImpl"),
        set_error_func: sym!(lib, "virSetErrorFunc"),
        get_last_error: sym!(lib, "virGetLastError"),
    })
}

/// A failed libvirt call: libvirt's error number and message (the
/// thread's last error), or why libvirt could not be loaded
/// ([`ERR_NOT_LOADED`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VirError {
    pub code: i32,
    pub message: String,
}

impl std::fmt::Display for VirError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for VirError {}

impl VirError {
    /// The calling thread's last libvirt error.
    fn last(api: &Api) -> Self {
        // SAFETY: virGetLastError returns the thread's error or null; the
        // fields read are copied before any other libvirt call.
        let e = unsafe { (api.get_last_error)() };
        if e.is_null() {
            return VirError { code: 0, message: "libvirt failed and said nothing".into() };
        }
        // SAFETY: non-null: libvirt's thread-local error, valid until the next call.
        let (code, message) = unsafe { ((*e).code, (*e).message) };
        let message = if message.is_null() {
            format!("libvirt error {code}")
        } else {
            // SAFETY: a NUL-terminated message owned by the error (above).
            unsafe { CStr::from_ptr(message) }.to_string_lossy().into_owned()
        };
        VirError { code, message }
    }
}

fn c_string(s: &str) -> Result<CString, VirError> {
    CString::new(s)
        .map_err(|_| VirError { code: ERR_ARGUMENT, message: format!("{s:?} holds a NUL byte") })
}

/// Copies a libvirt-allocated string and frees it.
///
/// # Safety
/// `p` is null or a NUL-terminated string from libvirt's allocator (malloc).
unsafe fn take_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: non-null and NUL-terminated (caller's contract).
    let s = unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned();
    // SAFETY: malloc'd by libvirt, not used again.
    unsafe { libc::free(p.cast()) };
    Some(s)
}

unsafe extern "C" fn quiet(_: *mut c_void, _: *mut RawError) {}

/// Keeps libvirt from printing errors on stderr: vigil returns and reports
/// them once. Does nothing if libvirt cannot be loaded (the first call
/// that needs it says why).
pub fn quiet_errors() {
    if let Ok(api) = api() {
        // SAFETY: a valid callback that ignores its arguments.
        unsafe { (api.set_error_func)(std::ptr::null_mut(), Some(quiet)) };
    }
}

/// Registers libvirt's default event loop (before opening the connections
/// that deliver events).
pub fn event_register_default_impl() -> Result<(), VirError> {
    let api = api()?;
    // SAFETY: no arguments; libvirt's own initialisation.
    if unsafe { (api.event_register_default_impl)() } < 0 {
        return Err(VirError::last(api));
    }
    Ok(())
}

/// Runs one iteration of the default event loop (blocks until an event).
pub fn event_run_default_impl() -> Result<(), VirError> {
    let api = api()?;
    // SAFETY: no arguments; called on one thread only, after registration.
    if unsafe { (api.event_run_default_impl)() } < 0 {
        return Err(VirError::last(api));
    }
    Ok(())
}

/// An open connection to libvirt, closed when dropped.
pub struct Connection {
    api: &'static Api,
    ptr: ConnPtr,
}

// SAFETY: libvirt connections may be used from any thread, concurrently
// (libvirt's API is thread-safe per its documentation).
unsafe impl Send for Connection {}
// SAFETY: as above.
unsafe impl Sync for Connection {}

impl Drop for Connection {
    fn drop(&mut self) {
        // SAFETY: `ptr` is the open connection this value owns.
        unsafe { (self.api.connect_close)(self.ptr) };
    }
}

impl Connection {
    pub fn open(uri: &str) -> Result<Self, VirError> {
        let api = api()?;
        let uri = c_string(uri)?;
        // SAFETY: a NUL-terminated URI.
        let ptr = unsafe { (api.connect_open)(uri.as_ptr()) };
        if ptr.is_null() {
            return Err(VirError::last(api));
        }
        Ok(Self { api, ptr })
    }

    pub fn set_keep_alive(&self, interval: i32, count: u32) -> Result<(), VirError> {
        // SAFETY: an open connection.
        if unsafe { (self.api.connect_set_keep_alive)(self.ptr, interval, count) } < 0 {
            return Err(VirError::last(self.api));
        }
        Ok(())
    }

    pub fn is_alive(&self) -> bool {
        // SAFETY: an open connection.
        unsafe { (self.api.connect_is_alive)(self.ptr) == 1 }
    }

    fn domain(&self, ptr: DomPtr) -> Result<Dom, VirError> {
        if ptr.is_null() {
            return Err(VirError::last(self.api));
        }
        Ok(Dom { api: self.api, ptr })
    }

    /// Every domain `flags` selects (`VIR_CONNECT_LIST_DOMAINS_*`).
    pub fn list_all_domains(&self, flags: u32) -> Result<Vec<Dom>, VirError> {
        let mut list: *mut DomPtr = std::ptr::null_mut();
        // SAFETY: an open connection; libvirt allocates the array.
        let n = unsafe { (self.api.connect_list_all_domains)(self.ptr, &mut list, flags) };
        let Ok(n) = usize::try_from(n) else { return Err(VirError::last(self.api)) };
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            // SAFETY: libvirt returned `n` domain pointers in `list`.
            let d = unsafe { *list.add(i) };
            out.push(Dom { api: self.api, ptr: d });
        }
        if !list.is_null() {
            // SAFETY: the array was malloc'd by libvirt; its domains are owned by `out`.
            unsafe { libc::free(list.cast()) };
        }
        Ok(out)
    }

    pub fn lookup_by_name(&self, name: &str) -> Result<Dom, VirError> {
        let name = c_string(name)?;
        // SAFETY: an open connection, a NUL-terminated name.
        self.domain(unsafe { (self.api.domain_lookup_by_name)(self.ptr, name.as_ptr()) })
    }

    pub fn lookup_by_uuid_string(&self, uuid: &str) -> Result<Dom, VirError> {
        let uuid = c_string(uuid)?;
        // SAFETY: an open connection, a NUL-terminated UUID.
        self.domain(unsafe { (self.api.domain_lookup_by_uuid_string)(self.ptr, uuid.as_ptr()) })
    }

    /// Registers `cb` for event `id` of every domain; libvirt calls `free`
    /// on `opaque` when the registration ends.
    ///
    /// # Safety
    /// `cb` must have the signature libvirt gives event `id`'s callbacks, and
    /// `opaque` must stay valid for it until `free` is called.
    pub(super) unsafe fn register_event(
        &self,
        id: c_int,
        cb: GenericCallback,
        opaque: *mut c_void,
        free: FreeCallback,
    ) -> Result<(), VirError> {
        // SAFETY: an open connection; a null domain means every domain; the
        // callback and `opaque` as the caller promises.
        let rc = unsafe {
            (self.api.connect_domain_event_register_any)(
                self.ptr,
                std::ptr::null_mut(),
                id,
                Some(cb),
                opaque,
                Some(free),
            )
        };
        if rc < 0 {
            return Err(VirError::last(self.api));
        }
        Ok(())
    }
}

/// A domain handle, freed when dropped.
pub struct Dom {
    api: &'static Api,
    ptr: DomPtr,
}

// SAFETY: as for `Connection`.
unsafe impl Send for Dom {}
// SAFETY: as for `Connection`.
unsafe impl Sync for Dom {}

impl Drop for Dom {
    fn drop(&mut self) {
        // SAFETY: the handle this value owns.
        unsafe { (self.api.domain_free)(self.ptr) };
    }
}

/// A domain's name and UUID, from a handle libvirt lends (an event's).
///
/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call.
pub(super) unsafe fn lent_domain_ids(dom: DomPtr) -> (String, String) {
    let Ok(api) = api() else { return (String::new(), String::new()) };
    // SAFETY: valid for the call (caller's contract).
    unsafe { ids(api, dom) }
}

/// # Safety
/// `dom` must be a valid domain pointer for the duration of the call.
unsafe fn ids(api: &Api, dom: DomPtr) -> (String, String) {
    let mut buf = [0 as c_char; 64];
    // SAFETY: `dom` is valid; the buffer holds the 37 bytes
    // VIR_UUID_STRING_BUFLEN asks for.
    let ok = unsafe { (api.domain_get_uuid_string)(dom, buf.as_mut_ptr()) } == 0;
    let uuid = if ok {
        // SAFETY: on success libvirt wrote a NUL-terminated string into `buf`.
        unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
    } else {
        String::new()
    };
    // SAFETY: `dom` is valid; the name lives as long as `dom` and is copied.
    let name = unsafe { (api.domain_get_name)(dom) };
    let name = if name.is_null() {
        String::new()
    } else {
        // SAFETY: non-null, NUL-terminated, owned by `dom`.
        unsafe { CStr::from_ptr(name) }.to_string_lossy().into_owned()
    };
    (uuid, name)
}

/// The statistics groups `stats` (`VIR_DOMAIN_STATS_*`) of `domains`, in
/// one call (`flags`: `VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT` and the
/// like; libvirt refuses its list filters here).
pub fn domain_list_stats(
    domains: &[&Dom],
    stats: u32,
    flags: u32,
) -> Result<Vec<DomainStats>, VirError> {
    let api = api()?;
    if domains.is_empty() {
        return Ok(Vec::new());
    }
    // libvirt takes a NULL-terminated array of the handles.
    let mut handles: Vec<DomPtr> = domains.iter().map(|d| d.ptr).collect();
    handles.push(std::ptr::null_mut());
    let mut list: *mut *mut RawStatsRecord = std::ptr::null_mut();
    // SAFETY: valid handles, borrowed for the call, and the terminating
    // null; libvirt allocates the list.
    let n = unsafe { (api.domain_list_get_stats)(handles.as_mut_ptr(), stats, &mut list, flags) };
    let Ok(n) = usize::try_from(n) else { return Err(VirError::last(api)) };
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        // SAFETY: libvirt returned `n` record pointers in `list`.
        let r = unsafe { &**list.add(i) };
        // SAFETY: the record's domain is valid while the list is.
        let (uuid, name) = unsafe { ids(api, r.dom) };
        let count = usize::try_from(r.nparams).unwrap_or(0);
        let params = if r.params.is_null() || count == 0 {
            &[][..]
        } else {
            // SAFETY: `nparams` parameters at `params`, valid while the list is.
            unsafe { std::slice::from_raw_parts(r.params, count) }
        };
        // SAFETY: libvirt's string parameters are NUL-terminated.
        let params = params.iter().filter_map(|p| unsafe { typed_param(p) }).collect();
        out.push(DomainStats { uuid, name, params });
    }
    if !list.is_null() {
        // SAFETY: the list libvirt gave, freed once, nothing of it kept.
        unsafe { (api.domain_stats_record_list_free)(list) };
    }
    Ok(out)
}

impl Dom {
    /// The domain's UUID and name (empty when libvirt would not say).
    pub fn ids(&self) -> (String, String) {
        // SAFETY: the handle this value owns.
        unsafe { ids(self.api, self.ptr) }
    }

    /// The domain's state (`VIR_DOMAIN_*`) and its reason.
    pub fn state(&self) -> Result<(i32, i32), VirError> {
        let (mut state, mut reason) = (0, 0);
        // SAFETY: the handle this value owns; two ints to write.
        if unsafe { (self.api.domain_get_state)(self.ptr, &mut state, &mut reason, 0) } < 0 {
            return Err(VirError::last(self.api));
        }
        Ok((state, reason))
    }

    pub fn is_active(&self) -> Result<bool, VirError> {
        // SAFETY: the handle this value owns.
        match unsafe { (self.api.domain_is_active)(self.ptr) } {
            n if n < 0 => Err(VirError::last(self.api)),
            n => Ok(n == 1),
        }
    }

    /// The most memory the domain may have, in KiB.
    pub fn max_memory_kib(&self) -> Result<u64, VirError> {
        let mut info = DomainInfo::default();
        // SAFETY: the handle this value owns; a `virDomainInfo` to fill.
        if unsafe { (self.api.domain_get_info)(self.ptr, &mut info) } < 0 {
            return Err(VirError::last(self.api));
        }
        Ok(info.max_mem)
    }

    /// `virDomainCoreDumpWithFormat`.
    pub fn core_dump_with_format(&self, to: &str, format: u32, flags: u32) -> Result<(), VirError> {
        let to = c_string(to)?;
        // SAFETY: the handle this value owns, a NUL-terminated path.
        let rc = unsafe {
            (self.api.domain_core_dump_with_format)(self.ptr, to.as_ptr(), format, flags)
        };
        if rc < 0 {
            return Err(VirError::last(self.api));
        }
        Ok(())
    }

    /// A command to the domain's QEMU monitor, through libvirt; its reply.
    pub fn qemu_monitor_command(&self, command: &str, flags: u32) -> Result<String, VirError> {
        let command = c_string(command)?;
        let mut reply: *mut c_char = std::ptr::null_mut();
        // SAFETY: the handle this value owns, a NUL-terminated command; libvirt
        // allocates the reply.
        let rc = unsafe {
            (self.api.domain_qemu_monitor_command)(self.ptr, command.as_ptr(), &mut reply, flags)
        };
        if rc < 0 {
            return Err(VirError::last(self.api));
        }
        // SAFETY: on success `reply` is a malloc'd NUL-terminated string.
        Ok(unsafe { take_string(reply) }.unwrap_or_default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param(name: &[u8], kind: c_int, value: RawTypedValue) -> RawTypedParam {
        let mut field = [0 as c_char; TYPED_PARAM_FIELD_LENGTH];
        for (f, &b) in field.iter_mut().zip(name) {
            *f = c_char::from_ne_bytes([b]);
        }
        RawTypedParam { field, kind, value }
    }

    #[test]
    fn the_typed_parameter_layout_is_libvirts() {
        // 80 bytes of name, the type, padding to the union's 8-byte alignment.
        assert_eq!(std::mem::size_of::<RawTypedParam>(), 96);
        assert_eq!(std::mem::offset_of!(RawTypedParam, value), 88);
        assert_eq!(std::mem::size_of::<RawStatsRecord>(), 24);
    }

    #[test]
    fn typed_parameters_are_read_by_their_type() {
        let s = CString::new("running").unwrap();
        let cases = [
            (
                param(b"vcpu.0.exits.sum", 4, RawTypedValue { ul: u64::MAX }),
                TypedValue::UInt(u64::MAX),
            ),
            (param(b"a", 1, RawTypedValue { i: -3 }), TypedValue::Int(-3)),
            (param(b"a", 2, RawTypedValue { ui: 7 }), TypedValue::UInt(7)),
            (param(b"a", 3, RawTypedValue { l: i64::MIN }), TypedValue::Int(i64::MIN)),
            (param(b"a", 5, RawTypedValue { d: 0.5 }), TypedValue::Double(0.5)),
            (param(b"a", 6, RawTypedValue { b: 1 }), TypedValue::Bool(true)),
            (
                param(b"a", 7, RawTypedValue { s: s.as_ptr().cast_mut() }),
                TypedValue::Str("running".into()),
            ),
            (
                param(b"a", 7, RawTypedValue { s: std::ptr::null_mut() }),
                TypedValue::Str(String::new()),
            ),
        ];
        for (i, (p, want)) in cases.into_iter().enumerate() {
            // SAFETY: the string parameters hold a live CString or null.
            let (name, got) = unsafe { typed_param(&p) }.unwrap();
            assert_eq!(got, want);
            assert_eq!(name, if i == 0 { "vcpu.0.exits.sum" } else { "a" });
        }
        // A type libvirt may add later is left out, not misread.
        // SAFETY: not a string parameter.
        assert!(unsafe { typed_param(&param(b"a", 8, RawTypedValue { ul: 1 })) }.is_none());
        // SAFETY: as above.
        assert!(unsafe { typed_param(&param(b"a", -1, RawTypedValue { ul: 1 })) }.is_none());
    }

    #[test]
    fn a_name_without_its_nul_ends_with_the_field() {
        let p = param(&[b'x'; 100], 4, RawTypedValue { ul: 1 });
        // SAFETY: not a string parameter.
        let (name, _) = unsafe { typed_param(&p) }.unwrap();
        assert_eq!(name.len(), TYPED_PARAM_FIELD_LENGTH);
        let p = param(&[0xff, b'a'], 4, RawTypedValue { ul: 1 });
        // SAFETY: as above.
        let (name, _) = unsafe { typed_param(&p) }.unwrap();
        assert_eq!(name, "\u{fffd}a");
    }
}
