//! The guest's loadable modules as the checks follow them: a live
//! module's text is taken when first seen and compared at every later
//! check, loads and unloads are events, and a module that stays loading or
//! unloading past a grace is reported.

use std::collections::HashMap;

use crate::addr::{GuestPhysAddr, GuestVirtAddr, PAGE_SIZE};
use crate::integrity::baseline::to_hex;
use crate::integrity::{AddressSpace, Finding, FindingKind, Severity};
use crate::memory::GuestMemory;

use super::region::Region;
use super::semantic;

/// Listed modules whose state is not live, since when, in which state.
///
/// The kernel leaves a module loading only while its init function runs,
/// and unloading only while its exit function runs; meanwhile its text is
/// not compared (the kernel still patches it). A module that stays so for
/// longer than `grace` is reported: a rootkit that writes its own state
/// would otherwise hide its text from the checks.
pub(crate) struct NotLive {
    pub(crate) since: HashMap<(String, u64), (u32, std::time::Instant)>,
    pub(crate) grace: std::time::Duration,
    /// Bytes of module text kept whole, across the domain's modules, for
    /// the patch review's originals; past it a module's text is kept as
    /// page hashes only (see [`MODULE_TEXT_KEPT`]).
    pub(crate) keep: u64,
    /// What the domain's memory budget leaves the modules' text kept whole
    /// (`limits.guest_memory` less what the rest of the watch holds):
    /// text past the smaller of this and `keep` is kept as hashes only.
    pub(crate) room: u64,
}

/// Module text kept whole per domain unless configured
/// (`limits.module_text`): some ten times a distribution kernel's usual
/// modules' text. A guest whose modules take more has the rest compared by
/// hash only: any change there is a violation, the kernel's own patches too.
pub const MODULE_TEXT_KEPT: u64 = 64 << 20;

/// Pages of module text hashed per check across the domain, at most: 256
/// MiB of text, far past what a real kernel loads. Modules past it are not
/// protected, and that is a violation (a forged module list).
pub const MAX_MODULE_PAGES_IN_ALL: u64 = 65_536;

/// How long a module may stay loading or unloading before it is reported,
/// unless configured (`schedule.module_grace`): long enough for an init
/// function waiting out the kernel's 60 s firmware timeout.
pub const MODULE_GRACE: std::time::Duration = std::time::Duration::from_secs(120);

impl Default for NotLive {
    fn default() -> Self {
        NotLive {
            since: HashMap::new(),
            grace: MODULE_GRACE,
            keep: MODULE_TEXT_KEPT,
            room: u64::MAX,
        }
    }
}

/// A live module's text as first seen.
pub(crate) struct ModuleText {
    pub(crate) hashes: Vec<[u8; 32]>,
    pub(crate) bytes: Vec<u8>,
}

/// Live modules' text as first seen, by (name, base).
pub(crate) type KnownModules = HashMap<(String, u64), ModuleText>;

/// A module appearing in or leaving the module list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleEvent {
    pub loaded: bool,
    pub name: String,
    pub base: u64,
    pub text_pages: u64,
}

/// Most pages of module text protected per module.
const MAX_MODULE_PAGES: u64 = 4096;

/// Hashes the text of live modules first seen now, compares the text of
/// those seen before, notes loads and unloads in `events`, and reports
/// modules that stay loading or unloading past the grace of `not_live`.
///
/// The guest loads and unloads modules while this runs: each module's text
/// is believed only if the module is live just before it is read and still
/// is just after ([`semantic::still_live`]). Otherwise it is left for the
/// next check, so that a module unloaded after the list was walked, and
/// another instance loaded at its base and not yet relocated, is not taken
/// for the module's text changed.
///
/// A known module that says it is unloading, or loading, stays known until
/// it leaves the list: if it turns live again, its text is compared with what
/// it was, so that a module cannot rewrite itself while claiming either. (A
/// real reload at the same base between two checks is compared so too, as
/// one that is live at both: a different build loaded there is reported.)
pub(crate) fn protect_modules<M: GuestMemory + ?Sized>(
    (known, not_live): (&mut KnownModules, &mut NotLive),
    events: &mut Vec<ModuleEvent>,
    m: &semantic::Matched<'_>,
    mem: &M,
    space: &dyn AddressSpace,
    now: std::time::Instant,
) -> Vec<Finding> {
    let mut out = Vec::new();
    events.clear();
    let list = &m.modules;
    let listed = |n: &str, b: u64, state: u32| {
        list.iter().any(|m| m.name == n && m.base == b && m.state == state)
    };
    // Gone, or in another state: counted afresh.
    not_live.since.retain(|(n, b), (state, _)| listed(n, *b, *state));
    for md in list.iter().filter(|m| m.state != semantic::MODULE_LIVE) {
        let (_, since) =
            *not_live.since.entry((md.name.clone(), md.base)).or_insert((md.state, now));
        let stayed = now.saturating_duration_since(since);
        if stayed >= not_live.grace {
            let gpa = space.translate(GuestVirtAddr(md.base)).map_or(GuestPhysAddr(0), |t| t.0);
            out.push(
                Finding::new(
                    &Region::Module(md.name.clone()).name(),
                    FindingKind::Unlisted,
                    Severity::Violation,
                    GuestVirtAddr(md.base),
                    gpa,
                )
                .saying(
                    format!(
                        "module {} has been {} for {} s: its text is not checked while it is not live, \
                         and the kernel leaves a module so only while its init or exit function runs",
                        md.name,
                        semantic::module_state_name(md.state),
                        stayed.as_secs()
                    ),
                    semantic::module_state_name(semantic::MODULE_LIVE).to_owned(),
                    semantic::module_state_name(md.state).to_owned(),
                ),
            );
        }
    }
    let live: Vec<&semantic::Module> =
        list.iter().filter(|m| m.state == semantic::MODULE_LIVE).collect();
    // Known and no longer listed, in any state, at its base.
    let gone: Vec<(String, u64)> = known
        .keys()
        .filter(|(n, b)| !list.iter().any(|m| &m.name == n && m.base == *b))
        .cloned()
        .collect();
    for key in gone {
        let pages = known.remove(&key).map_or(0, |t| t.hashes.len() as u64);
        events.push(ModuleEvent { loaded: false, name: key.0, base: key.1, text_pages: pages });
    }
    // Two live modules never share text: the kernel allocates each its own.
    // A list that says otherwise is forged (an entry aliasing another's
    // text, to make vigil hold it twice); the later entry is not followed.
    let mut order: Vec<usize> = (0..live.len()).collect();
    order.sort_by_key(|&i| (live[i].base, live[i].text_size));
    let mut aliased = vec![false; live.len()];
    let mut owner: Option<usize> = None;
    for &i in &order {
        let md = live[i];
        match owner {
            Some(o) if md.base < live[o].base.saturating_add(live[o].text_size) => {
                // Not followed either way; a violation only if both are
                // live still (not an unload and load caught between).
                aliased[i] = true;
                if semantic::still_live(m, mem, space, md)
                    && semantic::still_live(m, mem, space, live[o])
                {
                    out.push(module_list_violation(
                        md,
                        space,
                        format!(
                            "module {}'s text at {:#x} lies in module {}'s: the kernel gives each module text of its own, \
                             so the module list is forged; its text is not followed",
                            md.name, md.base, live[o].name
                        ),
                    ));
                }
            }
            _ => owner = Some(i),
        }
    }
    let mut kept: u64 = known.values().map(|t| t.bytes.len() as u64).sum();
    // Pages of text held (as hashes) for all known modules, in any state.
    let mut held: u64 = known.values().map(|t| t.hashes.len() as u64).sum();
    for (md, _) in live.iter().zip(&aliased).filter(|(_, a)| !**a) {
        let pages = md.text_size.div_ceil(PAGE_SIZE).min(MAX_MODULE_PAGES);
        let key = (md.name.clone(), md.base);
        if !known.contains_key(&key) && held.saturating_add(pages) > MAX_MODULE_PAGES_IN_ALL {
            out.push(module_list_violation(
                md,
                space,
                format!(
                    "module {} is not protected: the listed modules' text passes {MAX_MODULE_PAGES_IN_ALL} pages \
                     ({} MiB), far more than a kernel loads, so the module list is forged or broken",
                    md.name,
                    (MAX_MODULE_PAGES_IN_ALL * PAGE_SIZE) >> 20
                ),
            ));
            continue;
        }
        if !semantic::still_live(m, mem, space, md) {
            continue;
        }
        let mut hashes = Vec::with_capacity(pages as usize);
        let mut places = Vec::with_capacity(pages as usize);
        let mut bytes = Vec::new();
        for i in 0..pages {
            let va = md.base + i * PAGE_SIZE;
            match semantic::read_virt(mem, space, va, crate::addr::PAGE_BYTES) {
                Some((page, gpa)) => {
                    hashes.push(*blake3::hash(&page).as_bytes());
                    places.push((va, gpa));
                    bytes.extend_from_slice(&page);
                }
                None => break,
            }
        }
        if !semantic::still_live(m, mem, space, md) {
            continue;
        }
        match known.get(&key) {
            None => {
                events.push(ModuleEvent {
                    loaded: true,
                    name: md.name.clone(),
                    base: md.base,
                    text_pages: hashes.len() as u64,
                });
                let mut bytes = bytes;
                bytes.shrink_to_fit(); // held as long as the module is
                if kept.saturating_add(bytes.len() as u64) > not_live.keep.min(not_live.room) {
                    bytes = Vec::new();
                }
                kept += bytes.len() as u64;
                held += hashes.len() as u64;
                known.insert(key.clone(), ModuleText { hashes, bytes });
            }
            Some(old) => {
                // A page that differs, or that can no longer be read, is
                // read again through its mapping as it is now, and believed
                // only if the module is still live after: the module may
                // have been unloaded between the walk and the read, its
                // frames reused, and loaded again at its base.
                let again: Vec<(usize, u64, Option<PageNow>)> = (0..old.hashes.len())
                    .filter(|&i| hashes.get(i) != old.hashes.get(i))
                    .map(|i| {
                        let va = md.base + i as u64 * PAGE_SIZE;
                        let now = semantic::read_virt(mem, space, va, crate::addr::PAGE_BYTES)
                            .map(|(page, gpa)| (*blake3::hash(&page).as_bytes(), gpa));
                        (i, va, now)
                    })
                    .collect();
                if !again.is_empty() && !semantic::still_live(m, mem, space, md) {
                    continue;
                }
                let region = Region::Module(md.name.clone()).name();
                for (i, va, now) in again {
                    let was = to_hex(&old.hashes[i]);
                    let mut f = match now {
                        Some((h, _)) if h == old.hashes[i] => continue,
                        Some((h, gpa)) => Finding::new(&region, FindingKind::Content, Severity::Violation, GuestVirtAddr(va), gpa)
                            .saying(
                                format!("page {i} of the text of module {} changed after it was loaded", md.name),
                                was,
                                to_hex(&h),
                            ),
                        None => Finding::new(&region, FindingKind::Remap, Severity::Violation, GuestVirtAddr(va), GuestPhysAddr(0))
                            .saying(
                                format!(
                                    "page {i} of the text of module {} can no longer be read (not mapped) while the module is live",
                                    md.name
                                ),
                                was,
                                "unmapped".into(),
                            ),
                    };
                    f.page = Some(i as u64);
                    out.push(f);
                }
            }
        }
        // Said at every check while so, as a standing notice.
        if known.get(&key).is_some_and(|t| t.bytes.is_empty() && !t.hashes.is_empty()) {
            let gpa = space.translate(GuestVirtAddr(md.base)).map_or(GuestPhysAddr(0), |t| t.0);
            let mut f = Finding::new(
                &Region::Module(md.name.clone()).name(),
                FindingKind::Content,
                Severity::Info,
                GuestVirtAddr(md.base),
                gpa,
            );
            let limit = if not_live.room < not_live.keep {
                format!(
                    "what the domain's memory budget (limits.guest_memory) leaves them, {} MiB",
                    not_live.room >> 20
                )
            } else {
                format!("the {} MiB of limits.module_text", not_live.keep >> 20)
            };
            f.detail = format!(
                "module {}'s text is kept as page hashes only: the domain's modules already hold {limit} \
                 of text kept whole; a change to it is a violation, the kernel's own patches too",
                md.name
            );
            out.push(f);
        }
    }
    out
}

/// A page read again: its hash and frame.
type PageNow = ([u8; 32], GuestPhysAddr);

/// A violation of the module list itself, at `md`'s text.
fn module_list_violation(
    md: &semantic::Module,
    space: &dyn AddressSpace,
    detail: String,
) -> Finding {
    let gpa = space.translate(GuestVirtAddr(md.base)).map_or(GuestPhysAddr(0), |t| t.0);
    let mut f = Finding::new(
        &Region::Module(md.name.clone()).name(),
        FindingKind::Unlisted,
        Severity::Violation,
        GuestVirtAddr(md.base),
        gpa,
    );
    f.detail = detail;
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::PAGE_BYTES;
    use crate::linux::profile::Profile;
    use crate::x86::{Mapping, Perms};
    use std::time::Duration;

    /// Where the test's RAM is mapped: page 0 a `struct module`, page 1 its text.
    const W: u64 = 0xffff_ffff_c000_0000;

    /// Guest RAM holding one module, which is unloaded and loaded again at
    /// the same base (not yet live, its text not yet relocated) the moment
    /// its text is read, when `reload` is set.
    struct Reloading {
        now: std::sync::Mutex<crate::memory::RawDump>,
        again: Vec<u8>,
        reload: std::sync::atomic::AtomicBool,
        layout: crate::memory::RamLayout,
    }

    impl GuestMemory for Reloading {
        fn read(
            &self,
            start: GuestPhysAddr,
            buf: &mut [u8],
        ) -> Result<(), crate::memory::MemoryError> {
            let mut now = self.now.lock().unwrap();
            if start.raw() == PAGE_SIZE
                && self.reload.swap(false, std::sync::atomic::Ordering::SeqCst)
            {
                *now = crate::memory::RawDump::from_bytes(self.again.clone());
            }
            now.read(start, buf)
        }
        fn layout(&self) -> &crate::memory::RamLayout {
            &self.layout
        }
        fn kind(&self) -> &'static str {
            "raw-dump"
        }
    }

    struct Window;

    impl AddressSpace for Window {
        fn image_pages(&self) -> &[Mapping] {
            &[]
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
            let page = gva.raw().checked_sub(W)? / PAGE_SIZE;
            (page < 2).then(|| {
                (
                    GuestPhysAddr(page * PAGE_SIZE),
                    Perms { writable: false, user: false, executable: true },
                )
            })
        }
    }

    fn lab_profile() -> Profile {
        let path =
            concat!(env!("CARGO_MANIFEST_DIR"), "/../guest-profiles/6.1.0-56-cloud-amd64.profile");
        Profile::parse(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    /// Two pages seen through [`Window`]: a `struct module` named `name` in
    /// state `state` at `W`, and its text, every byte `text`, at `W` + 4 KiB.
    fn module_ram(profile: &Profile, name: &[u8], state: u32, text: u8) -> Vec<u8> {
        let off = |k: &str| usize::try_from(profile.offset(k).unwrap()).unwrap();
        let mut ram = vec![text; 2 * PAGE_BYTES];
        ram[..PAGE_BYTES].fill(0);
        ram[off("module.state")..][..4].copy_from_slice(&state.to_le_bytes());
        ram[off("module.name")..][..name.len()].copy_from_slice(name);
        ram[off("module.core_layout.base")..][..8].copy_from_slice(&(W + PAGE_SIZE).to_le_bytes());
        ram
    }

    #[test]
    fn a_module_loaded_again_under_the_read_is_not_a_changed_text() {
        let profile = lab_profile();
        let image = |state: u32, text: u8| module_ram(&profile, b"churn", state, text);
        let md = live("churn", W, W + PAGE_SIZE, PAGE_SIZE);
        let m = semantic::Matched {
            profile: &profile,
            modules: vec![md],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let mem = Reloading {
            now: std::sync::Mutex::new(crate::memory::RawDump::from_bytes(image(0, 0xcc))),
            // Coming (1), and its text as it is before relocation.
            again: image(1, 0x90),
            reload: false.into(),
            layout: crate::memory::RamLayout::flat(2 * PAGE_SIZE, "raw-dump").unwrap(),
        };
        let (mut known, mut not_live, mut events) =
            (HashMap::new(), NotLive::default(), Vec::new());
        let now = std::time::Instant::now();
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &mem, &Window, now);
        assert!(found.is_empty() && events.len() == 1 && events[0].loaded, "{found:?} {events:?}");

        mem.reload.store(true, std::sync::atomic::Ordering::SeqCst);
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &mem, &Window, now);
        assert!(found.is_empty(), "a reload under the read taken for a change: {found:?}");
        assert!(events.is_empty(), "{events:?}");

        // Once live with other text at the same base, it is a change.
        *mem.now.lock().unwrap() = crate::memory::RawDump::from_bytes(image(0, 0x90));
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &mem, &Window, now);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].detail.contains("page 0 of the text of module churn changed"),
            "{found:?}"
        );
    }

    /// Three frames: a `struct module` (live) at frame 0, and the module's
    /// text at `W` + 4 KiB in frame 1 until `moved` translations of it have
    /// been made, in frame 2 after: the module unloaded, frame 1 reused,
    /// and loaded again at its base.
    struct Moving {
        moved: std::sync::atomic::AtomicU32,
    }

    impl AddressSpace for Moving {
        fn image_pages(&self) -> &[Mapping] {
            &[]
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
            let page = gva.raw().checked_sub(W)? / PAGE_SIZE;
            let frame = match page {
                0 => 0,
                1 if self.moved.load(std::sync::atomic::Ordering::SeqCst) > 0 => {
                    self.moved.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    1
                }
                1 => 2,
                _ => return None,
            };
            Some((
                GuestPhysAddr(frame * PAGE_SIZE),
                Perms { writable: false, user: false, executable: true },
            ))
        }
    }

    #[test]
    fn a_text_frame_reused_under_the_read_is_read_again_where_the_text_is_now() {
        let profile = lab_profile();
        let md = live("churn", W, W + PAGE_SIZE, PAGE_SIZE);
        let m = semantic::Matched {
            profile: &profile,
            modules: vec![md],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let ram = |frame1: u8, frame2: u8| {
            let mut ram = module_ram(&profile, b"churn", 0, frame1);
            ram.extend(std::iter::repeat_n(frame2, PAGE_BYTES));
            crate::memory::RawDump::from_bytes(ram)
        };
        let space = Moving { moved: u32::MAX.into() };
        let (mut known, mut not_live, mut events) =
            (HashMap::new(), NotLive::default(), Vec::new());
        let now = std::time::Instant::now();
        let mut check = |mem: &crate::memory::RawDump, moved: u32| {
            space.moved.store(moved, std::sync::atomic::Ordering::SeqCst);
            protect_modules((&mut known, &mut not_live), &mut events, &m, mem, &space, now)
        };
        let found = check(&ram(0xcc, 0), u32::MAX);
        assert!(found.is_empty(), "{found:?}");
        // Frame 1 now a page table; the first read finds it, the text is in
        // frame 2 as it was.
        let found = check(&ram(0x67, 0xcc), 1);
        assert!(found.is_empty(), "a reused frame taken for the module's text: {found:?}");
        // The text in its new frame changed: reported there.
        let found = check(&ram(0x67, 0x90), 1);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].gpa, GuestPhysAddr(2 * PAGE_SIZE), "{found:?}");
    }

    fn live(name: &str, addr: u64, base: u64, text_size: u64) -> semantic::Module {
        semantic::Module {
            name: name.into(),
            addr,
            base,
            size: text_size,
            text_size,
            state: semantic::MODULE_LIVE,
            init: (0, 0),
            data: (0, 0),
        }
    }

    /// A forged list whose second entry aliases the first's text: a
    /// violation, and the alias is not followed (held once, not twice).
    #[test]
    fn a_module_whose_text_lies_in_anothers_is_a_forged_list() {
        let profile = lab_profile();
        let ram = crate::memory::RawDump::from_bytes(module_ram(&profile, b"churn", 0, 0xcc));
        let m = semantic::Matched {
            profile: &profile,
            // Listed twice: the same struct, the same text.
            modules: vec![
                live("churn", W, W + PAGE_SIZE, PAGE_SIZE),
                live("churn", W, W + PAGE_SIZE, PAGE_SIZE),
            ],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let (mut known, mut not_live, mut events) =
            (HashMap::new(), NotLive::default(), Vec::new());
        let now = std::time::Instant::now();
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &ram, &Window, now);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (found[0].region.as_str(), found[0].severity),
            ("module:churn", Severity::Violation)
        );
        assert!(found[0].detail.contains("lies in module churn's"), "{}", found[0].detail);
        assert_eq!(known.len(), 1, "{:?}", known.keys());
    }

    /// Past the text kept whole, a module's text is kept as hashes only,
    /// said at every check; past the pages hashed in all, a module is not
    /// followed, and that is a violation.
    #[test]
    fn module_text_is_bounded_per_domain() {
        let profile = lab_profile();
        let ram = crate::memory::RawDump::from_bytes(module_ram(&profile, b"churn", 0, 0xcc));
        let now = std::time::Instant::now();
        // Room for no byte: hashes only, and said at each check.
        let m = semantic::Matched {
            profile: &profile,
            modules: vec![live("churn", W, W + PAGE_SIZE, PAGE_SIZE)],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let (mut known, mut events) = (HashMap::new(), Vec::new());
        let mut not_live = NotLive { keep: 0, ..NotLive::default() };
        for _ in 0..2 {
            let found =
                protect_modules((&mut known, &mut not_live), &mut events, &m, &ram, &Window, now);
            assert_eq!(found.len(), 1, "{found:?}");
            assert_eq!(found[0].severity, Severity::Info);
            assert!(found[0].detail.contains("kept as page hashes only"), "{}", found[0].detail);
        }
        let t = &known[&("churn".to_owned(), W + PAGE_SIZE)];
        assert!(t.bytes.is_empty() && t.hashes.len() == 1);
        assert!(found_detail_names(
            &m,
            &ram,
            NotLive { keep: 0, ..NotLive::default() },
            "limits.module_text"
        ));
        // The domain's memory budget leaving no room does the same, and
        // says which bound it was.
        assert!(found_detail_names(
            &m,
            &ram,
            NotLive { room: 0, ..NotLive::default() },
            "limits.guest_memory"
        ));
        let (mut known, mut events) = (HashMap::new(), Vec::new());
        let mut roomy = NotLive { room: PAGE_SIZE, ..NotLive::default() };
        let found = protect_modules((&mut known, &mut roomy), &mut events, &m, &ram, &Window, now);
        assert!(found.is_empty(), "{found:?}");
        assert_eq!(known[&("churn".to_owned(), W + PAGE_SIZE)].bytes.len() as u64, PAGE_SIZE);
        // Known modules (in any state: this one listed as unloading)
        // holding every page allowed: a new one is not followed, and that
        // is a violation.
        let going = semantic::Module { state: semantic::MODULE_GOING, ..live("going", 0, 0, 0) };
        let m = semantic::Matched {
            profile: &profile,
            modules: vec![going, live("churn", W, W + PAGE_SIZE, PAGE_SIZE)],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let full = ModuleText {
            hashes: vec![[0; 32]; usize::try_from(MAX_MODULE_PAGES_IN_ALL).unwrap()],
            bytes: Vec::new(),
        };
        let (mut known, mut not_live, mut events) =
            (HashMap::from([(("going".to_owned(), 0), full)]), NotLive::default(), Vec::new());
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &ram, &Window, now);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].region, "module:churn");
        assert_eq!(found[0].severity, Severity::Violation);
        assert!(found[0].detail.contains("is not protected"), "{}", found[0].detail);
        assert_eq!(known.len(), 1, "the new module held past the bound");
    }

    /// Whether a first check under `not_live` keeps the module's text as
    /// hashes only, saying so with `bound` named.
    fn found_detail_names(
        m: &semantic::Matched<'_>,
        ram: &crate::memory::RawDump,
        mut not_live: NotLive,
        bound: &str,
    ) -> bool {
        let (mut known, mut events) = (HashMap::new(), Vec::new());
        let now = std::time::Instant::now();
        let found = protect_modules((&mut known, &mut not_live), &mut events, m, ram, &Window, now);
        found.len() == 1
            && found[0].detail.contains("kept as page hashes only")
            && found[0].detail.contains(bound)
            && known.values().all(|t| t.bytes.is_empty())
    }

    /// [`Window`], with the module's text page unmapped once `gone` is set.
    struct Unmapping {
        gone: std::sync::atomic::AtomicBool,
    }

    impl AddressSpace for Unmapping {
        fn image_pages(&self) -> &[Mapping] {
            &[]
        }
        fn translate(&self, gva: GuestVirtAddr) -> Option<(GuestPhysAddr, Perms)> {
            let text = gva.raw() >= W + PAGE_SIZE;
            if text && self.gone.load(std::sync::atomic::Ordering::SeqCst) {
                return None;
            }
            Window.translate(gva)
        }
    }

    /// A live module's text page unmapped (a rootkit hiding its changes
    /// from the reads): a violation, not a page skipped.
    #[test]
    fn a_live_modules_text_page_no_longer_mapped_is_a_violation() {
        let profile = lab_profile();
        let ram = crate::memory::RawDump::from_bytes(module_ram(&profile, b"churn", 0, 0xcc));
        let m = semantic::Matched {
            profile: &profile,
            modules: vec![live("churn", W, W + PAGE_SIZE, PAGE_SIZE)],
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let space = Unmapping { gone: false.into() };
        let (mut known, mut not_live, mut events) =
            (HashMap::new(), NotLive::default(), Vec::new());
        let now = std::time::Instant::now();
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &ram, &space, now);
        assert!(found.is_empty(), "{found:?}");
        space.gone.store(true, std::sync::atomic::Ordering::SeqCst);
        let found =
            protect_modules((&mut known, &mut not_live), &mut events, &m, &ram, &space, now);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].severity, Severity::Violation);
        assert!(found[0].detail.contains("can no longer be read"), "{}", found[0].detail);
    }

    /// A module that claims to be unloading: reported once it has stayed so
    /// past the grace, and compared with its old text if it turns live again.
    #[test]
    fn a_module_that_stays_unloading_or_rewrites_itself_meanwhile_is_caught() {
        let profile = lab_profile();
        let image = |state: u32, text: u8| {
            crate::memory::RawDump::from_bytes(module_ram(&profile, b"sly\0", state, text))
        };
        // `None`: not in the module list.
        let matched = |state: Option<u32>| semantic::Matched {
            profile: &profile,
            modules: state
                .map(|state| semantic::Module {
                    name: "sly".into(),
                    addr: W,
                    base: W + PAGE_SIZE,
                    size: PAGE_SIZE,
                    text_size: PAGE_SIZE,
                    state,
                    init: (0, 0),
                    data: (0, 0),
                })
                .into_iter()
                .collect(),
            slide: 0,
            idt_slide: None,
            reads: Default::default(),
        };
        let going = semantic::MODULE_GOING;
        let (mut known, mut events) = (HashMap::new(), Vec::new());
        let mut not_live = NotLive { grace: Duration::from_secs(60), ..NotLive::default() };
        // `u32::MAX` as the state: not listed.
        let t0 = std::time::Instant::now();
        let mut check = |state: u32, mem: &crate::memory::RawDump, at: u64| {
            let m = matched((state != u32::MAX).then_some(state));
            let now = t0 + Duration::from_secs(at);
            let found =
                protect_modules((&mut known, &mut not_live), &mut events, &m, mem, &Window, now);
            (found, events.clone())
        };

        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0xcc), 0);
        assert!(found.is_empty() && ev.len() == 1 && ev[0].loaded, "{found:?} {ev:?}");
        // Unloading, its text rewritten: not compared, and not yet reported.
        let (found, ev) = check(going, &image(going, 0x90), 1);
        assert!(found.is_empty(), "{found:?}");
        assert!(ev.is_empty(), "an unloading module still listed is not gone: {ev:?}");
        let (found, _) = check(going, &image(going, 0x90), 59);
        assert!(found.is_empty(), "reported within the grace: {found:?}");
        // Live again with other text: the text it had is what it is held to.
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0x90), 60);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].detail.contains("page 0 of the text of module sly changed"), "{found:?}");
        assert!(ev.is_empty(), "{ev:?}");

        // Unloading again, and staying so: reported once the grace is over,
        // timed from when it last changed state.
        let (found, _) = check(going, &image(going, 0x90), 100);
        assert!(found.is_empty(), "{found:?}");
        let (found, _) = check(going, &image(going, 0x90), 159);
        assert!(found.is_empty(), "{found:?}");
        let (found, _) = check(going, &image(going, 0x90), 161);
        assert_eq!(found.len(), 1, "{found:?}");
        let f = &found[0];
        assert_eq!((f.region.as_str(), f.severity), ("module:sly", Severity::Violation));
        assert!(f.detail.contains("module sly has been unloading for 61 s"), "{}", f.detail);
        assert_eq!((f.gva, f.gpa), (GuestVirtAddr(W + PAGE_SIZE), GuestPhysAddr(PAGE_SIZE)));
        assert_eq!((f.before.as_str(), f.after.as_str()), ("live", "unloading"));

        // Gone from the list: an unload, and nothing more to report.
        let (found, ev) = check(u32::MAX, &image(going, 0x90), 200);
        assert!(found.is_empty() && ev.len() == 1 && !ev[0].loaded, "{found:?} {ev:?}");
        let (found, ev) = check(going, &image(going, 0x90), 201);
        assert!(found.is_empty() && ev.is_empty(), "counted from before it left: {found:?}");

        // Claiming to be loading (a new instance at the same base, for all
        // the list says) does not wipe the slate either: live again with
        // other text, it is a change, and no unload or load was seen.
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0xcc), 300);
        assert!(found.is_empty() && ev.len() == 1 && ev[0].loaded, "{found:?} {ev:?}");
        let coming = semantic::MODULE_COMING;
        let (found, ev) = check(coming, &image(coming, 0x90), 301);
        assert!(found.is_empty() && ev.is_empty(), "{found:?} {ev:?}");
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0x90), 302);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].detail.contains("page 0 of the text of module sly changed"), "{found:?}");
        assert!(ev.is_empty(), "{ev:?}");
        // Gone from the list for one check, then back with other text: a
        // real unload and load, and the new text is the new reference.
        let (found, ev) = check(u32::MAX, &image(0, 0x90), 400);
        assert!(found.is_empty() && ev.len() == 1 && !ev[0].loaded, "{found:?} {ev:?}");
        let (found, ev) = check(semantic::MODULE_LIVE, &image(0, 0xcc), 401);
        assert!(found.is_empty() && ev.len() == 1 && ev[0].loaded, "{found:?} {ev:?}");
    }
}
