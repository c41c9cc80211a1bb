//! Images built by `PageImport` from pages in any order, checked against a paused save of the same
//! memory and against the reference image builder.

#![allow(
    clippy::unwrap_used,
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss,
    reason = "test and benchmark code: a failed unwrap is a failed run, and its sizes and counts are small \
              constants of the test"
)]

mod common;

use common::{fill_random, same_shape, snapshot, two_regions, Rng};
use memory::{
    reference, restore, save_paused, verify, Durability, Error, GuestMemory, ImageLayout, ImageWriter,
    PageImport, RestoreOptions, PAGE_SIZE,
};
use proptest::prelude::*;

fn read_page(mem: &GuestMemory, page: u64) -> [u8; PAGE_SIZE] {
    let mut data = [0u8; PAGE_SIZE];
    mem.read(mem.gpa_of_page(page), &mut data).unwrap();
    data
}

#[test]
fn pages_in_random_order_with_duplicates_give_the_paused_save_image() {
    let dir = tempfile::tempdir().unwrap();
    let mem = two_regions(3000, 700);
    fill_random(&mem, 40, &mut Rng(11));
    let layout = ImageLayout::with_seed(&mem, 99);
    let reference_path = dir.path().join("reference.img");
    let sink = ImageWriter::create(&reference_path, layout.clone(), Durability::NoSync).unwrap();
    let saved = save_paused(&mem, Box::new(sink)).unwrap();

    // Every page once in a shuffled order, like QEMU's stream; some sent early with stale content
    // (random or zero) and again later; some zero pages never sent at all.
    let mut rng = Rng(12);
    let total = mem.total_pages();
    let mut order: Vec<u64> = (0..total).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let path = dir.path().join("import.img");
    let sink = ImageWriter::create(&path, layout.clone(), Durability::Sync).unwrap();
    let mut import = PageImport::new(Box::new(sink));
    let mut stale = [0u8; PAGE_SIZE];
    let (mut skipped, mut resent) = (0, 0);
    for &page in &order {
        let data = read_page(&mem, page);
        let zero = data.iter().all(|&b| b == 0);
        match rng.below(10) {
            0 if zero => {
                skipped += 1;
                continue;
            }
            1 => {
                stale.iter_mut().for_each(|b| *b = rng.next() as u8);
                import.page(page, &stale).unwrap();
                resent += 1;
            }
            2 => {
                import.zero(page).unwrap();
                resent += 1;
            }
            _ => {}
        }
        if zero && rng.below(2) == 0 {
            import.zero(page).unwrap();
        } else {
            import.page(page, &data).unwrap();
        }
    }
    let stats = import.seal().unwrap();
    assert_eq!(stats.duplicates, resent);
    assert_eq!(stats.pages_received, total - skipped + resent);
    assert_eq!(stats.pages_missing, skipped);
    assert_eq!(stats.present_pages, saved.present_pages);
    assert_eq!(stats.zero_pages, total - saved.present_pages);

    // Same seed, same pages: byte for byte the image the paused save wrote.
    assert_eq!(
        std::fs::read(&path).unwrap(),
        std::fs::read(&reference_path).unwrap()
    );
    assert_eq!(verify(&path).unwrap().present_pages, saved.present_pages);
    let target = same_shape(&mem);
    fill_random(&target, 30, &mut Rng(13));
    restore(&path, &target, &RestoreOptions::default()).unwrap();
    assert_eq!(snapshot(&target), snapshot(&mem));
    // Only the sealed images remain: no temporary left behind.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn abandoned_import_leaves_no_file_and_bad_pages_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mem = GuestMemory::anonymous(16 * PAGE_SIZE as u64).unwrap();
    let sink =
        ImageWriter::create(&dir.path().join("img"), ImageLayout::of(&mem), Durability::NoSync).unwrap();
    let mut import = PageImport::new(Box::new(sink));
    import.page(3, &[7u8; PAGE_SIZE]).unwrap();
    let error = import.page(16, &[7u8; PAGE_SIZE]).unwrap_err();
    assert!(
        matches!(error, Error::PageOutOfRange { page: 16, pages: 16 }),
        "{error}"
    );
    assert!(matches!(import.zero(1 << 40), Err(Error::PageOutOfRange { .. })));
    drop(import);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

/// One push: page `page` gets content `fill` (0 = zero data), or a zero record.
#[derive(Debug, Clone)]
enum Push {
    Page(u64, u8),
    Zero(u64),
}

fn pushes(pages: u64) -> impl Strategy<Value = Vec<Push>> {
    // Runs of consecutive pages exercise the stage; single pages and repeats break and overwrite it.
    let run = (0..pages, 1..40u64, 0..4u8).prop_map(move |(first, len, fill)| {
        (first..(first + len).min(pages))
            .map(|p| Push::Page(p, fill.wrapping_mul(p as u8 | 1)))
            .collect::<Vec<_>>()
    });
    let single = prop_oneof![
        (0..pages, any::<u8>()).prop_map(|(p, fill)| vec![Push::Page(p, fill)]),
        (0..pages).prop_map(|p| vec![Push::Zero(p)]),
    ];
    prop::collection::vec(prop_oneof![run, single], 0..60)
        .prop_map(|groups| groups.into_iter().flatten().collect())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// The staged, batched import writes exactly the image of the last value pushed for each page.
    #[test]
    fn import_matches_the_reference_image(pushes in pushes(300)) {
        let pages = 300u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let layout = ImageLayout::new(
            vec![
                memory::RegionInfo { gpa: 0, len: 200 * PAGE_SIZE as u64 },
                memory::RegionInfo { gpa: 1 << 32, len: 100 * PAGE_SIZE as u64 },
            ],
            3,
        )
        .unwrap();
        let sink = ImageWriter::create(&path, layout.clone(), Durability::NoSync).unwrap();
        let mut import = PageImport::new(Box::new(sink));
        let mut expected = vec![0u8; pages as usize * PAGE_SIZE];
        for push in &pushes {
            let (page, fill) = match *push {
                Push::Page(page, fill) => {
                    import.page(page, &[fill; PAGE_SIZE]).unwrap();
                    (page, fill)
                }
                Push::Zero(page) => {
                    import.zero(page).unwrap();
                    (page, 0)
                }
            };
            expected[page as usize * PAGE_SIZE..][..PAGE_SIZE].fill(fill);
        }
        let stats = import.seal().unwrap();
        prop_assert_eq!(stats.pages_received, pushes.len() as u64);
        prop_assert_eq!(std::fs::read(&path).unwrap(), reference::image_bytes(&expected, &layout));
    }
}
