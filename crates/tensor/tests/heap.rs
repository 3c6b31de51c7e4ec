//! `heap::CacheLineAligned`: large blocks start on a cache line, and resizing across the
//! threshold keeps the contents.

use std::alloc::{GlobalAlloc, Layout};

use scalpel_tensor::heap::{CacheLineAligned, ALIGNED_FROM_BYTES};

#[test]
fn large_blocks_start_on_a_cache_line_and_keep_their_bytes_when_resized() {
    let a = CacheLineAligned;
    let small = Layout::from_size_align(ALIGNED_FROM_BYTES / 4, 4).unwrap();
    // SAFETY: non-zero sizes; every block is freed once with the layout it has at that point.
    unsafe {
        for size in [ALIGNED_FROM_BYTES, 3 * ALIGNED_FROM_BYTES + 4, 1 << 22] {
            let layout = Layout::from_size_align(size, 4).unwrap();
            let mut blocks = Vec::new();
            // Several at once, so that they are not all the same recycled block.
            for _ in 0..8 {
                let p = a.alloc(layout);
                assert!(!p.is_null());
                assert_eq!(p as usize % 64, 0, "a {size}-byte block at {p:?}");
                blocks.push(p);
            }
            for p in blocks {
                a.dealloc(p, layout);
            }
        }
        // A small block grown past the threshold: moved to an aligned one, bytes kept; and back.
        let p = a.alloc(small);
        for i in 0..small.size() {
            *p.add(i) = (i % 251) as u8;
        }
        let grown = a.realloc(p, small, 4 * ALIGNED_FROM_BYTES);
        assert_eq!(grown as usize % 64, 0);
        for i in 0..small.size() {
            assert_eq!(*grown.add(i), (i % 251) as u8, "byte {i} after growing");
        }
        let grown_layout = Layout::from_size_align(4 * ALIGNED_FROM_BYTES, 4).unwrap();
        let shrunk = a.realloc(grown, grown_layout, small.size() / 2);
        for i in 0..small.size() / 2 {
            assert_eq!(*shrunk.add(i), (i % 251) as u8, "byte {i} after shrinking");
        }
        a.dealloc(
            shrunk,
            Layout::from_size_align(small.size() / 2, 4).unwrap(),
        );
        let zeroed = a.alloc_zeroed(grown_layout);
        assert_eq!(zeroed as usize % 64, 0);
        assert!((0..grown_layout.size()).all(|i| *zeroed.add(i) == 0));
        a.dealloc(zeroed, grown_layout);
    }
}
