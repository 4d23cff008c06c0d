"""Datasets of the training script: file readers on generated fixtures, synthetic scenes, augmentation."""

import numpy as np
import pytest
import torch

pytest.importorskip("PIL")

from protoseg_ext.train.data import (  # noqa: E402
    ADE20K_CLASSES,
    CITYSCAPES_CLASSES,
    IGNORE_INDEX,
    ADE20KDataset,
    CityscapesDataset,
    DatasetError,
    ScheduleSampler,
    SyntheticScenes,
    TrainView,
    build_dataset,
    cityscapes_id_to_train_id,
    export_synthetic,
    look_shares,
)

SIZE = (32, 64)


@pytest.fixture(scope="module")
def cityscapes_root(tmp_path_factory):
    return export_synthetic(tmp_path_factory.mktemp("cs"), "cityscapes", train=3, val=2, size=SIZE)


@pytest.fixture(scope="module")
def ade_root(tmp_path_factory):
    return export_synthetic(tmp_path_factory.mktemp("ade"), "ade20k", train=3, val=2, size=SIZE)


def test_synthetic_scenes_are_deterministic_and_varied():
    a, b = SyntheticScenes("train", SIZE, 4, seed=0), SyntheticScenes("train", SIZE, 4, seed=0)
    img0, lbl0 = a.load(0)
    assert img0.shape == (*SIZE, 3) and img0.dtype == np.uint8 and lbl0.shape == SIZE
    np.testing.assert_array_equal(img0, b.load(0)[0])
    np.testing.assert_array_equal(lbl0, b.load(0)[1])
    assert not np.array_equal(img0, a.load(1)[0])
    assert not np.array_equal(img0, SyntheticScenes("val", SIZE, 4, seed=0).load(0)[0])
    assert not np.array_equal(img0, SyntheticScenes("train", SIZE, 4, seed=1).load(0)[0])
    labels = np.concatenate([a.load(i)[1].ravel() for i in range(4)])
    assert labels.max() < a.num_classes and len(np.unique(labels)) >= 4  # several classes per few scenes


def _look_stats(scenes):
    """Per (class, look): pixel count and summed RGB; per class: images (sky, ground) or pixels of each look."""
    C, L = scenes.num_classes, scenes.looks
    n = np.zeros((C, L))
    rgb = np.zeros((C, L, 3))
    first = np.zeros((2, L))  # the look of the sky and of the ground, one per image
    for i in range(len(scenes)):
        image, label, look = scenes.load_looks(i)
        for c in range(C):
            for k in range(L):
                m = (label == c) & (look == k)
                n[c, k] += m.sum()
                rgb[c, k] += image[m].astype(np.float64).sum(0)
        for c in (0, 1):
            first[c, np.bincount(look[label == c], minlength=L).argmax()] += 1
    return n, rgb / np.maximum(n, 1)[..., None], first


def test_multi_look_scenes_have_distinct_looks_in_uneven_shares():
    shares = look_shares(3)
    np.testing.assert_allclose(shares, [4 / 7, 2 / 7, 1 / 7])
    assert look_shares(1).tolist() == [1.0]
    scenes = SyntheticScenes("train", (32, 64), 200, seed=0, looks=3)
    n, mean, first = _look_stats(scenes)
    assert (n > 0).all(), "every class shows each of its three looks"
    # distinct looks: the mean colours of a class's looks lie far apart (0-255 scale)
    for c in range(scenes.num_classes):
        for a in range(3):
            for b in range(a + 1, 3):
                gap = np.linalg.norm(mean[c, a] - mean[c, b])
                assert gap > 35, f"class {scenes.class_names[c]}: looks {a} and {b} differ by {gap:.0f} only"
    # uneven shares: the sky's and the ground's look (one per image) against the shares, within
    # 4 binomial standard errors, and in the order of the shares
    T = len(scenes)
    for c in (0, 1):
        se = np.sqrt(T * shares * (1 - shares))
        assert (np.abs(first[c] - T * shares) <= 4 * se).all(), (scenes.class_names[c], first[c])
        assert first[c][0] > first[c][1] > first[c][2]
    # deterministic by seed; one look is the one-look scene
    again = SyntheticScenes("train", (32, 64), 3, seed=0, looks=3)
    for i in range(3):
        for x, y in zip(scenes.load_looks(i), again.load_looks(i)):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(scenes.load(0)[0], SyntheticScenes("train", (32, 64), 1, seed=1, looks=3).load(0)[0])
    one, plain = SyntheticScenes("train", SIZE, 2, looks=1), SyntheticScenes("train", SIZE, 2)
    np.testing.assert_array_equal(one.load(1)[0], plain.load(1)[0])
    assert (one.load_looks(1)[2] == 0).all()
    with pytest.raises(ValueError, match="looks"):
        SyntheticScenes("train", SIZE, 2, looks=4)
    with pytest.raises(ValueError, match="looks"):
        look_shares(0)


@pytest.mark.parametrize("layout", ["cityscapes", "ade20k"])
def test_multi_look_scenes_in_the_file_layouts(tmp_path, layout):
    """The on-disk writers write the multi-look scenes: the same labels, the pictures of the looks."""
    root = export_synthetic(tmp_path, layout, train=2, val=1, size=SIZE, seed=3, looks=3)
    ds = CityscapesDataset(root, "train") if layout == "cityscapes" else ADE20KDataset(root, "training")
    scenes = SyntheticScenes("train", SIZE, 2, seed=3, looks=3)
    sky = CITYSCAPES_CLASSES.index("sky") if layout == "cityscapes" else ADE20K_CLASSES.index("sky")
    for i in range(2):
        image, label = ds.load(i)
        want_image, want_label = scenes.load(i)
        np.testing.assert_array_equal(label == sky, want_label == 0)
        if layout == "cityscapes":  # PNG: lossless
            np.testing.assert_array_equal(image, want_image)
    built = build_dataset("synthetic", "val", synthetic_size=SIZE, synthetic_count=(2, 2), seed=3, synthetic_looks=3)
    assert built.looks == 3 and np.array_equal(built.load(1)[0], SyntheticScenes("val", SIZE, 2, 3, looks=3).load(1)[0])


def test_cityscapes_reader(cityscapes_root):
    train, val = CityscapesDataset(cityscapes_root, "train"), CityscapesDataset(cityscapes_root, "val")
    assert len(train) == 3 and len(val) == 2 and train.num_classes == 19
    image, label = train.load(0)
    assert image.shape == (*SIZE, 3) and label.shape == SIZE
    # synthetic sky and ground become Cityscapes "sky" and "road"
    expected = SyntheticScenes("train", SIZE, 3).load(0)[1]
    np.testing.assert_array_equal(label == CITYSCAPES_CLASSES.index("sky"), expected == 0)
    np.testing.assert_array_equal(label == CITYSCAPES_CLASSES.index("road"), expected == 1)
    assert train.name(0) == "synth_000000_000019"


def test_ade20k_reader_shifts_labels(ade_root):
    train = build_dataset("ade20k", "train", root=str(ade_root))
    assert isinstance(train, ADE20KDataset) and len(train) == 3 and train.num_classes == 150
    _, label = train.load(0)
    expected = SyntheticScenes("train", SIZE, 3).load(0)[1]
    np.testing.assert_array_equal(label == ADE20K_CLASSES.index("sky"), expected == 0)
    # file value 0 ("other") is ignored, v > 0 becomes v - 1
    from PIL import Image

    path = train.pairs[0][1]
    raw = np.asarray(Image.open(path)).copy()
    raw[0, :5] = 0
    Image.fromarray(raw).save(path)
    _, label = train.load(0)
    assert (label[0, :5] == IGNORE_INDEX).all()
    np.testing.assert_array_equal(label[1:], raw[1:].astype(np.int64) - 1)


def test_missing_directory_names_it(tmp_path):
    with pytest.raises(DatasetError, match=str(tmp_path / "leftImg8bit" / "train")):
        CityscapesDataset(tmp_path, "train")
    with pytest.raises(DatasetError, match="images"):
        ADE20KDataset(tmp_path, "training")


def test_image_without_label_names_the_image(tmp_path):
    root = export_synthetic(tmp_path, "cityscapes", train=2, val=1, size=SIZE)
    label = next((root / "gtFine" / "train").glob("*/*_labelTrainIds.png"))
    label.unlink()
    image_name = label.name.replace("_gtFine_labelTrainIds", "_leftImg8bit")
    with pytest.raises(DatasetError, match=image_name):
        CityscapesDataset(root, "train")


def test_unreadable_files_are_named(tmp_path):
    root = export_synthetic(tmp_path, "ade20k", train=2, val=1, size=SIZE)
    ds = ADE20KDataset(root, "training")
    ds.pairs[0][0].write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=ds.pairs[0][0].name):
        ds.load(0)
    ds.pairs[1][1].write_bytes(b"\x89PNG broken")
    with pytest.raises(DatasetError, match=ds.pairs[1][1].name):
        ds.load(1)


def test_label_values_outside_the_classes_are_named(tmp_path):
    from PIL import Image

    root = export_synthetic(tmp_path, "cityscapes", train=1, val=1, size=SIZE)
    ds = CityscapesDataset(root, "train")
    Image.fromarray(np.full(SIZE, 33, np.uint8)).save(ds.pairs[0][1])  # a labelIds file, not train ids
    with pytest.raises(DatasetError, match="holds value 33"):
        ds.load(0)


def test_augmentation_is_keyed_by_epoch_and_index():
    view = TrainView(SyntheticScenes("train", SIZE, 4), crop=(24, 40), scale_range=(0.5, 2.0))
    x, y = view[(1, 0)]
    assert x.shape == (3, 24, 40) and x.dtype == torch.float32 and y.shape == (24, 40) and y.dtype == torch.int64
    assert ((y >= 0) & (y < 8) | (y == IGNORE_INDEX)).all()
    x2, y2 = view[(1, 0)]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, view[(1, 1)][0])


def test_crop_larger_than_image_pads_with_ignore():
    view = TrainView(SyntheticScenes("train", SIZE, 1), crop=(64, 128), scale_range=(1.0, 1.0), flip=False)
    x, y = view[(0, 0)]
    assert (y[SIZE[0] :] == IGNORE_INDEX).all() and (y[:, SIZE[1] :] == IGNORE_INDEX).all()
    assert (y[: SIZE[0], : SIZE[1]] != IGNORE_INDEX).all()
    assert x[:, SIZE[0] :].abs().max() < 0.02  # the mean colour: zero after normalisation


def test_schedule_sampler_resumes_mid_epoch_and_shards():
    ds = SyntheticScenes("train", SIZE, 10)

    def take(sampler, n):
        it = iter(sampler)
        return [next(it) for _ in range(n)]

    full = take(ScheduleSampler(ds, seed=3), 25)
    assert sorted(i for i, e in full[:10]) == list(range(10)) and {e for _, e in full[:10]} == {0}
    assert take(ScheduleSampler(ds, seed=3, start=7), 18) == full[7:]
    r0, r1 = take(ScheduleSampler(ds, 0, 2, seed=3), 5), take(ScheduleSampler(ds, 1, 2, seed=3), 5)
    assert sorted(i for i, _ in r0 + r1) == list(range(10))
    with pytest.raises(DatasetError):
        ScheduleSampler(SyntheticScenes("train", SIZE, 1), 0, 2)


# ---------------------------------------------------------------- Cityscapes as downloaded (labelIds)


def test_cityscapes_id_table_is_the_official_one():
    table = cityscapes_id_to_train_id()
    assert len(table) == 34  # labelIds 0 (unlabeled) .. 33 (bicycle)
    # a few entries of cityscapesscripts' helpers/labels.py: (name, id, trainId)
    for name, label_id, train_id in [("road", 7, 0), ("sidewalk", 8, 1), ("building", 11, 2), ("pole", 17, 5),
                                     ("sky", 23, 10), ("car", 26, 13), ("train", 31, 16), ("bicycle", 33, 18)]:
        assert table[label_id] == train_id and CITYSCAPES_CLASSES[train_id] == name
    # unlabeled .. ground (0-6), parking, rail track, guard rail, bridge, tunnel, polegroup, caravan, trailer
    for label_id in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30):
        assert table[label_id] == IGNORE_INDEX
    assert sorted(table[table != IGNORE_INDEX]) == list(range(19))


def test_cityscapes_label_ids_are_mapped_to_train_ids(tmp_path):
    from PIL import Image

    ids_root = export_synthetic(tmp_path / "ids", "cityscapes", train=2, val=1, size=SIZE, label_ids=True)
    train_root = export_synthetic(tmp_path / "train", "cityscapes", train=2, val=1, size=SIZE)
    assert not list((ids_root / "gtFine").rglob("*_labelTrainIds.png"))
    by_ids, by_train = CityscapesDataset(ids_root, "train"), CityscapesDataset(train_root, "train")
    assert by_ids.pairs[0][1].name.endswith("_gtFine_labelIds.png")
    np.testing.assert_array_equal(by_ids.load(0)[1], by_train.load(0)[1])
    # ids of classes that are not evaluated become ignored
    path = by_ids.pairs[0][1]
    raw = np.asarray(Image.open(path)).copy()
    raw[0, :4] = [0, 1, 4, 30]  # unlabeled, ego vehicle, static, trailer
    raw[1, :3] = [7, 24, 33]  # road, person, bicycle
    Image.fromarray(raw).save(path)
    label = by_ids.load(0)[1]
    assert (label[0, :4] == IGNORE_INDEX).all() and list(label[1, :3]) == [0, 11, 18]
    # labelTrainIds wins when both files are there
    path.rename(path.with_name(path.name.replace("_labelIds", "_labelTrainIds")))
    Image.fromarray(np.zeros(SIZE, np.uint8)).save(path)
    assert CityscapesDataset(ids_root, "train").pairs[0][1].name.endswith("_labelTrainIds.png")


def test_cityscapes_label_ids_outside_the_table_are_named(tmp_path):
    from PIL import Image

    root = export_synthetic(tmp_path, "cityscapes", train=2, val=1, size=SIZE, label_ids=True)
    ds = CityscapesDataset(root, "train")
    raw = np.asarray(Image.open(ds.pairs[1][1])).copy()
    raw[3, 5] = 34
    Image.fromarray(raw).save(ds.pairs[1][1])
    ds.load(0)
    with pytest.raises(DatasetError, match=f"label {ds.pairs[1][1]} holds value 34: expected Cityscapes labelIds"):
        ds.load(1)
    with pytest.raises(DatasetError, match="holds value 34"):  # the check before training finds it too
        ds.check_labels(threads=2)


def test_cityscapes_without_either_label_file_says_what_it_expected(tmp_path):
    root = export_synthetic(tmp_path, "cityscapes", train=1, val=1, size=SIZE, label_ids=True)
    label = next((root / "gtFine" / "train").glob("*/*_labelIds.png"))
    label.unlink()
    with pytest.raises(DatasetError, match="_gtFine_labelTrainIds.png or .*_gtFine_labelIds.png"):
        CityscapesDataset(root, "train")
