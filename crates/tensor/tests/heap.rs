//! `heap::TensorHeap`: large blocks start on a cache line, resizing across the threshold keeps
//! the contents, and freed blocks above glibc's mmap ceiling are handed out again (zeroed when
//! asked) up to the bound.

use std::alloc::{GlobalAlloc, Layout};

use scalpel_tensor::heap::{TensorHeap, ALIGNED_FROM_BYTES, KEPT_LARGE_BLOCKS, LARGE_FROM_BYTES};

#[test]
fn large_blocks_start_on_a_cache_line_and_keep_their_bytes_when_resized() {
    let a = TensorHeap;
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

#[test]
fn freed_large_blocks_are_reused_for_the_same_layout_and_zeroed_when_asked() {
    let a = TensorHeap;
    // A size no other test allocates through this allocator, so the kept blocks are ours.
    let layout = Layout::from_size_align(LARGE_FROM_BYTES + 4 * 4099, 4).unwrap();
    let other = Layout::from_size_align(LARGE_FROM_BYTES + 4 * 4100, 4).unwrap();
    // SAFETY: non-zero sizes; every block is written inside its size and freed once with the
    // layout it was allocated with.
    unsafe {
        let p = a.alloc(layout);
        assert!(!p.is_null());
        assert_eq!(p as usize % 64, 0);
        std::ptr::write_bytes(p, 0xA5, layout.size());
        a.dealloc(p, layout);
        // Another size does not get the kept block.
        let q = a.alloc(other);
        assert_ne!(q, p, "a block of another size was handed the kept one");
        // The same layout does, and a zeroed allocation clears every byte the last owner left.
        let z = a.alloc_zeroed(layout);
        assert_eq!(z, p, "the freed block was not reused");
        assert!(
            (0..layout.size()).all(|i| *z.add(i) == 0),
            "a reused block not zeroed"
        );
        a.dealloc(z, layout);
        // Past the bound, freed blocks go back to the system. Each block is marked with its
        // number before it is freed; the allocations after are served from the kept blocks
        // first (marks intact), then by glibc, whose blocks of this size are fresh zero pages
        // from `mmap` (the premise of keeping them).
        let blocks: Vec<*mut u8> = (0..KEPT_LARGE_BLOCKS + 2)
            .map(|_| a.alloc(layout))
            .collect();
        for (n, &p) in blocks.iter().enumerate() {
            assert!(!p.is_null());
            std::ptr::write_bytes(p, n as u8 + 1, layout.size());
            a.dealloc(p, layout);
        }
        let again: Vec<*mut u8> = (0..KEPT_LARGE_BLOCKS + 2)
            .map(|_| a.alloc(layout))
            .collect();
        let marks: Vec<u8> = again.iter().map(|&p| *p.add(layout.size() - 1)).collect();
        let kept = marks.iter().filter(|&&m| m != 0).count();
        assert_eq!(
            kept, KEPT_LARGE_BLOCKS,
            "last bytes of the blocks after: {marks:?}"
        );
        for p in again {
            a.dealloc(p, layout);
        }
        // Freed last, so that its slot did not count against the bound above.
        a.dealloc(q, other);
    }
}
