//! The order a heal visits its examples in (length grouping) and the teacher's embeddings it
//! keeps across epochs.

use scalpel::surgery::heal::BatchOrder;
use scalpel::surgery::teacher_targets::{TeacherTargets, TEACHER_TARGETS_FILE};
use scalpel::tensor::Tensor;

#[test]
fn grouped_batches_visit_every_example_once_an_epoch_with_little_padding() {
    // 1000 examples of lengths 1..=40, batches of 4: windows of 256 examples.
    let lengths: Vec<usize> = (0..1000).map(|i| 1 + (i * 7919) % 40).collect();
    let plain = BatchOrder::new(1000, 4, true, 3);
    let grouped = BatchOrder::new(1000, 4, true, 3).grouped_by(lengths.clone());
    let padded = |order: &BatchOrder, epoch: usize| -> usize {
        let per_epoch = order.batches_per_epoch();
        let mut seen = vec![0; 1000];
        let mut tokens = 0;
        for k in epoch * per_epoch..(epoch + 1) * per_epoch {
            let batch = order.batch(k);
            assert_eq!(batch.len(), 4);
            batch.iter().for_each(|&i| seen[i] += 1);
            tokens += batch.len() * batch.iter().map(|&i| lengths[i]).max().unwrap();
        }
        assert!(
            seen.iter().all(|&n| n == 1),
            "epoch {epoch} visits each once"
        );
        tokens
    };
    // No padding at all would be Σ lengths; sorted windows of 256 examples of 40 lengths come
    // within 5 % of it, while random batches of 4 pad to about 1.6 times as many tokens.
    let unpadded: usize = lengths.iter().sum();
    for epoch in 0..2 {
        let (random, sorted) = (padded(&plain, epoch), padded(&grouped, epoch));
        assert!(
            sorted * 100 <= unpadded * 105 && random * 10 > unpadded * 13,
            "epoch {epoch}: {sorted} (grouped) and {random} (random) padded tokens for {unpadded}"
        );
    }
    assert_ne!(grouped.batch(0), grouped.batch(250), "epochs differ");
    let again = BatchOrder::new(1000, 4, true, 3).grouped_by(lengths.clone());
    assert_eq!(grouped.batch(17), again.batch(17), "reproducible");
    // Without shuffling the file order stays.
    let unshuffled = BatchOrder::new(1000, 4, false, 3).grouped_by(lengths);
    assert_eq!(unshuffled.batch(1), [4, 5, 6, 7]);
    // A short last batch stays last.
    let odd = BatchOrder::new(10, 4, true, 1).grouped_by(vec![1; 10]);
    assert_eq!(odd.batch(2).len(), 2);
}

#[test]
fn each_sentence_is_embedded_once_and_saved_rows_load_back() {
    let mut targets = TeacherTargets::new(5, 2);
    let embed_calls = std::cell::RefCell::new(Vec::new());
    // The "teacher" embeds sentence i as [i, -i].
    let embed = |new: &[usize]| {
        embed_calls.borrow_mut().push(new.to_vec());
        Ok(Tensor::from_vec(
            &[new.len(), 2],
            new.iter().flat_map(|&i| [i as f32, -(i as f32)]).collect(),
        )?)
    };
    let first = targets.batch(&[3, 1], embed).unwrap();
    assert_eq!(first.to_vec::<f32>(), [3.0, -3.0, 1.0, -1.0]);
    let second = targets.batch(&[1, 4, 3], embed).unwrap();
    assert_eq!(second.to_vec::<f32>(), [1.0, -1.0, 4.0, -4.0, 3.0, -3.0]);
    assert_eq!(*embed_calls.borrow(), [vec![3, 1], vec![4]]);

    let dir = std::env::temp_dir().join(format!("scalpel_targets_{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(TEACHER_TARGETS_FILE);
    targets.save(&path).unwrap();
    let mut loaded = TeacherTargets::load(&path, 5, 2).unwrap();
    let again = loaded
        .batch(&[4, 0], |new| {
            assert_eq!(new, [0], "only the never-seen sentence is embedded");
            embed(new)
        })
        .unwrap();
    assert_eq!(again.to_vec::<f32>(), [4.0, -4.0, 0.0, 0.0]);

    let wrong_width = TeacherTargets::load(&path, 5, 3).err().unwrap().to_string();
    assert!(wrong_width.contains("`embeddings` [k, 3]"), "{wrong_width}");
    let too_few = TeacherTargets::load(&path, 4, 2).err().unwrap().to_string();
    assert!(too_few.contains("index 4 is out of range"), "{too_few}");
    std::fs::remove_dir_all(&dir).unwrap();
}
