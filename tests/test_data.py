"""Dataset layouts, validation errors, and the sharded, resumable iterator (`glm_jax.data`)."""

from __future__ import annotations

import filecmp
import importlib.util
import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from glm_jax import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "data")


def colour(i: int) -> tuple[int, int, int]:
    """A distinct colour per index, so a loaded image tells which file it came from."""
    return (17 * i % 256, 200 - 7 * i % 200, 50 + 29 * i % 200)


def write_image(path: str, i: int, size: tuple[int, int] = (40, 24), fmt: str = "PNG") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour(i)).save(path, fmt)


def make_folder(root, lines: list[str], targets: dict[str, int], sources: dict[str, int] | None = None,
                prefix: str = "") -> str:
    """A folder dataset: `lines` joined with newlines; `targets` / `sources` map file names to colour indices."""
    root = str(root)
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, f"{prefix}prompts.txt"), "w") as f:
        f.write("\n".join(lines) + "\n")
    for name, c in targets.items():
        write_image(os.path.join(root, f"{prefix}target_images", name), c, fmt=_fmt(name))
    for name, c in (sources or {}).items():
        write_image(os.path.join(root, f"{prefix}source_images", name), c, size=(24, 40), fmt=_fmt(name))
    return root


def _fmt(name: str) -> str:
    return {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}[name.rsplit(".", 1)[1]]


def mean_colour(img: np.ndarray) -> tuple[int, ...]:
    return tuple(round(float(v)) for v in img.reshape(-1, 3).mean(0))


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(data.DataError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------- samples

@pytest.mark.parametrize("mode,n_train", [("t2i", 16), ("i2i", 12)])
def test_sample_sets_validate(mode, n_train):
    train, ev = data.load_splits(os.path.join(DATA, mode), mode, check_target=data.size_rule(multiple=32),
                                 check_source=data.size_rule(multiple=32, min_side=32, max_side=128))
    assert len(train) == n_train and ev is not None and len(ev) == 4
    for ds in (train, ev):
        assert ds.size_counts()["target"] == {(64, 64): len(ds)}
        assert all(len(e.sources) == (mode == "i2i") for e in ds.examples)
        assert len({e.prompt for e in ds.examples}) == len(ds)
    b = next(data.eval_iterator(ev, 4))
    assert all(t.shape == (64, 64, 3) and t.dtype == np.uint8 for t in b.targets)
    assert all(np.ptp(t) > 50 for t in b.targets)                 # drawn scenes, not blank images


def test_sample_text_prompts_have_quoted_text():
    from glm_jax.glyph import quoted_texts
    ds = data.load_dataset(os.path.join(DATA, "t2i"), "t2i")
    assert sum(bool(quoted_texts(e.prompt)) for e in ds.examples) >= 4


@pytest.mark.skipif(not os.path.isdir("/usr/share/fonts/truetype/dejavu"), reason="needs fonts-dejavu-core")
def test_make_samples_reproduces_committed_bytes(tmp_path):
    spec = importlib.util.spec_from_file_location("make_samples", os.path.join(DATA, "make_samples.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod.main(["make_samples.py", str(tmp_path)])
    for mode in ("t2i", "i2i"):
        cmp = filecmp.dircmp(os.path.join(DATA, mode), str(tmp_path / mode))
        stack = [cmp]
        while stack:
            c = stack.pop()
            assert not c.left_only and not c.right_only, (c.left, c.left_only, c.right_only)
            _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
            assert not mismatch and not errors, (c.left, mismatch, errors)
            stack.extend(c.subdirs.values())
    total = sum(os.path.getsize(os.path.join(d, f)) for m in ("t2i", "i2i")
                for d, _, fs in os.walk(os.path.join(DATA, m)) for f in fs)
    assert total < 300_000


# ------------------------------------------------------------------------------------------------- index rule

def test_blank_lines_do_not_shift_pairing(tmp_path):
    lines = ["p0", "", "p2", "   ", "", "p5"]
    root = make_folder(tmp_path, lines, {"0.png": 0, "2.jpg": 2, "5.webp": 5},
                       {"0.png": 10, "2_1.png": 21, "2_0.png": 20, "2_10.png": 30, "2_2.png": 22, "5.png": 15})
    ds = data.load_dataset(root, "i2i")
    assert [(e.index, e.prompt) for e in ds.examples] == [(0, "p0"), (2, "p2"), (5, "p5")]
    assert ds[1].where.endswith("prompts.txt:3")
    assert [os.path.basename(s) for s in ds[1].sources] == ["2_0.png", "2_1.png", "2_2.png", "2_10.png"]
    assert ds[0].target_size == (40, 24) and ds[0].source_sizes == ((24, 40),)
    b = next(data.eval_iterator(ds, 3))
    assert b.prompts == ("p0", "p2", "p5")
    for i, t, srcs in zip((0, 2, 5), b.targets, b.sources):
        assert t.shape == (24, 40, 3)
        tol = 3 if i == 2 else 0                                   # 2.jpg is lossy
        assert np.abs(np.subtract(mean_colour(t), colour(i))).max() <= tol
    assert [mean_colour(s) for s in b.sources[1]] == [colour(20), colour(21), colour(22), colour(30)]
    assert mean_colour(b.sources[0][0]) == colour(10) and b.sources[0][0].shape == (40, 24, 3)


def test_crlf_bom_and_whitespace(tmp_path):
    root = tmp_path / "d"
    make_folder(root, ["x"], {"0.png": 0, "1.png": 1, "3.png": 3})
    (root / "prompts.txt").write_bytes("\ufeff  first \r\nsecond\r\n\r\nfourth".encode())
    ds = data.load_dataset(str(root), "t2i")
    assert [(e.index, e.prompt) for e in ds.examples] == [(0, "first"), (1, "second"), (3, "fourth")]


# ----------------------------------------------------------------------------------------------------- errors

def _case_prompt_without_image(tmp):
    return make_folder(tmp, ["a", "b", "c"], {"0.png": 0, "1.png": 1}), "t2i", "prompts.txt:3"


def _case_image_without_prompt_past_end(tmp):
    return make_folder(tmp, ["a", "b"], {"0.png": 0, "1.png": 1, "2.png": 2}), "t2i", "prompts.txt:3"


def _case_image_on_blank_line(tmp):
    return make_folder(tmp, ["a", "", "c"], {"0.png": 0, "1.png": 1, "2.png": 2}), "t2i", "prompts.txt:2"


def _case_unreadable_image(tmp):
    root = make_folder(tmp, ["a", "b"], {"0.png": 0})
    (tmp / "target_images" / "1.png").write_bytes(b"not an image at all")
    return root, "t2i", "prompts.txt:2"


def _truncated(tmp, fmt, ext):
    root = make_folder(tmp, ["a", "b"], {"0.png": 0})
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (48, 40, 3), np.uint8)).save(buf, fmt)
    (tmp / "target_images" / f"1.{ext}").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return root, "t2i", "prompts.txt:2"


def _case_truncated_png(tmp):
    return _truncated(tmp, "PNG", "png")


def _case_truncated_jpeg(tmp):                   # passes PIL's verify(); only the decode finds it
    return _truncated(tmp, "JPEG", "jpg")


def _case_empty_prompts(tmp):
    return make_folder(tmp, ["", "  ", ""], {}), "t2i", "prompts.txt:1"


def _case_duplicate_index(tmp):
    return make_folder(tmp, ["a", "b", "c", "d"], {f"{i}.png": i for i in range(4)} | {"3.jpg": 3}), "t2i", \
        "prompts.txt:4"


def _case_t2i_with_sources(tmp):
    return make_folder(tmp, ["a", "b"], {"0.png": 0, "1.png": 1}, {"1.png": 5}), "t2i", "prompts.txt:2"


def _case_i2i_missing_sources(tmp):
    return make_folder(tmp, ["a", "b"], {"0.png": 0, "1.png": 1}), "i2i", "prompts.txt:1"


def _case_i2i_one_source_missing(tmp):
    return make_folder(tmp, ["a", "", "b"], {"0.png": 0, "2.png": 2}, {"0.png": 1}), "i2i", "prompts.txt:3"


def _case_mixed_source_naming(tmp):
    return make_folder(tmp, ["a", "b"], {"0.png": 0, "1.png": 1}, {"0.png": 0, "1.png": 1, "1_0.png": 2}), \
        "i2i", "prompts.txt:2"


def _manifest(tmp, lines, mode, line):
    for i in range(3):
        write_image(str(tmp / "img" / f"{i}.png"), i)
    (tmp / "m.jsonl").write_text("\n".join(lines) + "\n")
    return str(tmp / "m.jsonl"), mode, f"m.jsonl:{line}"


def _case_manifest_bad_json(tmp):
    return _manifest(tmp, ['{"prompt": "a", "target": "img/0.png"}', "", '{"prompt": "b", "target": img/1.png}'],
                     "t2i", 3)


def _case_manifest_missing_key(tmp):
    return _manifest(tmp, ['{"prompt": "a", "target": "img/0.png", "sources": ["img/2.png"]}',
                           '{"prompt": "b", "target": "img/1.png"}'], "i2i", 2)


def _case_manifest_unknown_key(tmp):
    return _manifest(tmp, ['{"prompt": "a", "target": "img/0.png", "source": ["img/2.png"]}'], "t2i", 1)


def _case_manifest_t2i_with_sources(tmp):
    return _manifest(tmp, ['{"prompt": "a", "target": "img/0.png"}',
                           '{"prompt": "b", "target": "img/1.png", "sources": ["img/2.png"]}'], "t2i", 2)


def _case_manifest_missing_image(tmp):
    return _manifest(tmp, ['{"prompt": "a", "target": "img/7.png"}'], "t2i", 1)


def _case_source_size_rule(tmp):
    root = make_folder(tmp, ["a", "b"], {"0.png": 0, "1.png": 1}, {"0.png": 2})
    write_image(str(tmp / "source_images" / "1.png"), 3, size=(64, 48))
    return root, "i2i", "prompts.txt:2"


ERROR_CASES = {name[6:]: fn for name, fn in globals().items() if name.startswith("_case_")}


@pytest.mark.parametrize("case", sorted(ERROR_CASES))
def test_errors_name_file_and_line(tmp_path, case):
    path, mode, where = ERROR_CASES[case](tmp_path)
    rule = data.size_rule(multiple=8, max_side=50) if case == "source_size_rule" else None
    msg = error_of(data.load_dataset, path, mode, check_source=rule)
    assert where in msg, msg
    assert os.path.dirname(str(tmp_path / "x")) in msg                       # the full path of the file


def test_error_collects_all_problems(tmp_path):
    root = make_folder(tmp_path, ["a", "b", "c", "d"], {"0.png": 0})
    with pytest.raises(data.DataError) as info:
        data.load_dataset(root, "t2i")
    assert len(info.value.problems) == 3 and "(and 2 more problems)" in str(info.value)


def test_missing_folder_parts(tmp_path):
    assert "prompts.txt: not found" in error_of(data.load_dataset, str(tmp_path), "t2i")
    assert "not a dataset folder" in error_of(data.load_dataset, str(tmp_path / "x.txt"), "t2i")
    (tmp_path / "prompts.txt").write_text("a\n")
    assert "target_images: not found" in error_of(data.load_dataset, str(tmp_path), "t2i")


# ------------------------------------------------------------------------------------------------- manifest

def test_manifest_equals_folder_layout(tmp_path):
    folder = make_folder(tmp_path / "f", ["p0", "", "p2", "p3"], {"0.png": 0, "2.png": 2, "3.png": 3},
                         {"0.png": 10, "2_0.png": 20, "2_1.png": 21, "3.png": 13})
    ds_f = data.load_dataset(folder, "i2i")
    man = tmp_path / "m" / "train.jsonl"
    man.parent.mkdir()
    recs = [json.dumps({"prompt": e.prompt, "target": os.path.relpath(e.target, man.parent),
                        "sources": [os.path.relpath(s, man.parent) for s in e.sources]}) for e in ds_f.examples]
    man.write_text(recs[0] + "\n\n" + "\n".join(recs[1:]) + "\n")       # the same blank line
    ds_m = data.load_dataset(str(man), "i2i")

    def key(ds):
        return [(e.index, e.prompt, os.path.realpath(e.target), tuple(map(os.path.realpath, e.sources)),
                 e.target_size, e.source_sizes) for e in ds.examples]

    assert key(ds_m) == key(ds_f)
    assert ds_m.fingerprint() == ds_f.fingerprint()
    it_f, it_m = data.train_iterator(ds_f, 2, seed=3), data.train_iterator(ds_m, 2, seed=3)
    for _ in range(3):
        bf, bm = next(it_f), next(it_m)
        assert bf.prompts == bm.prompts and all(np.array_equal(a, b) for a, b in zip(bf.targets, bm.targets))
        assert all(np.array_equal(a, b) for sa, sb in zip(bf.sources, bm.sources) for a, b in zip(sa, sb))


def test_load_splits_eval_path(tmp_path):
    make_folder(tmp_path / "d", ["a", "b"], {"0.png": 0, "1.png": 1})
    train, ev = data.load_splits(str(tmp_path / "d"), "t2i")
    assert len(train) == 2 and ev is None
    make_folder(tmp_path / "d", ["e"], {"0.png": 5}, prefix="eval_")
    _, ev = data.load_splits(str(tmp_path / "d"), "t2i")
    assert ev.split == "eval" and ev.examples[0].prompt == "e"
    make_folder(tmp_path / "e", ["x", "y", "z"], {f"{i}.png": i for i in range(3)})
    _, ev = data.load_splits(str(tmp_path / "d"), "t2i", eval_path=str(tmp_path / "e"))
    assert [e.prompt for e in ev.examples] == ["x", "y", "z"]


def test_images_as_stored(tmp_path):
    root = make_folder(tmp_path, ["rgba", "gray", "rotated"], {})
    t = tmp_path / "target_images"
    t.mkdir()
    Image.new("RGBA", (33, 17), (10, 20, 30, 0)).save(t / "0.png")
    Image.new("L", (21, 13), 99).save(t / "1.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                                   # rotate 90 degrees on display
    Image.new("RGB", (30, 10), (250, 0, 0)).save(t / "2.jpg", exif=exif.tobytes())
    ds = data.load_dataset(root, "t2i")
    assert [e.target_size for e in ds.examples] == [(33, 17), (21, 13), (10, 30)]
    b = next(data.eval_iterator(ds, 3))
    assert [x.shape for x in b.targets] == [(17, 33, 3), (13, 21, 3), (30, 10, 3)]
    assert all(x.dtype == np.uint8 for x in b.targets)
    assert mean_colour(b.targets[0]) == (10, 20, 30) and mean_colour(b.targets[1]) == (99, 99, 99)


# ------------------------------------------------------------------------------------------------- iterator

@pytest.fixture(scope="module")
def ds13(tmp_path_factory):
    root = tmp_path_factory.mktemp("ds13")
    return data.load_dataset(make_folder(root, [f"p{i}" for i in range(13)], {f"{i}.png": i for i in range(13)}),
                             "t2i")


def take(it, k):
    return [next(it) for _ in range(k)]


def test_shuffle_deterministic_and_differs_between_epochs(ds13):
    a = take(data.train_iterator(ds13, 4, seed=7, load_images=False), 9)
    b = take(data.train_iterator(ds13, 4, seed=7, load_images=False), 9)
    assert [x.indices.tolist() for x in a] == [x.indices.tolist() for x in b]
    assert [x.epoch for x in a] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    epochs = [np.concatenate([x.indices for x in a[3 * e:3 * e + 3]]) for e in range(3)]
    for e in epochs:
        assert len(set(e.tolist())) == 12                               # no repeats inside an epoch; 1 dropped
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert sorted(data.epoch_order(13, 7, 0).tolist()) == list(range(13))
    assert not np.array_equal(data.epoch_order(1000, 7, 0), data.epoch_order(1000, 8, 0))
    assert not np.array_equal(data.epoch_order(1000, 7, 0), np.arange(1000))
    c = take(data.train_iterator(ds13, 4, seed=7, shuffle=False, load_images=False), 4)
    assert [x.indices.tolist() for x in c] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]
    # the dropped example changes between epochs, so every example is seen over a few epochs
    seen = set(np.concatenate([x.indices for x in take(data.train_iterator(ds13, 4, seed=7, load_images=False),
                                                        30)]).tolist())
    assert seen == set(range(13))


def test_two_processes_see_disjoint_complete_shards(ds13):
    one = data.train_iterator(ds13, 6, seed=1)
    procs = [data.train_iterator(ds13, 6, seed=1, process_index=p, process_count=2) for p in range(2)]
    for _ in range(5):
        g = next(one)
        b0, b1 = next(procs[0]), next(procs[1])
        assert len(b0.indices) == len(b1.indices) == 3
        assert not set(b0.indices.tolist()) & set(b1.indices.tolist())
        assert b0.indices.tolist() + b1.indices.tolist() == g.indices.tolist()
        assert b0.prompts + b1.prompts == g.prompts
        assert all(np.array_equal(x, y) for x, y in zip(b0.targets + b1.targets, g.targets))
    assert "multiple of process_count" in error_of(data.train_iterator, ds13, 5, process_count=2)


def test_processes_share_the_global_prompts_and_sources(tmp_path):
    """Each process holds its own rows (prompts, targets, sources) and knows the whole global batch's prompts and,
    with `global_sources=True`, its sources (the conditioning every process builds for the rollouts)."""
    n = 8
    root = make_folder(tmp_path, [f"p{i}" for i in range(n)], {f"{i}.png": i for i in range(n)},
                       {f"{i}.png": 20 + i for i in range(n)})
    ds = data.load_dataset(root, "i2i")
    one = data.train_iterator(ds, 4, seed=3, global_sources=True)
    procs = [data.train_iterator(ds, 4, seed=3, process_index=p, process_count=2, global_sources=True)
             for p in range(2)]
    for _ in range(3):
        g = next(one)
        b = [next(it) for it in procs]
        assert [x.rows for x in b] == [slice(0, 2), slice(2, 4)] and g.rows == slice(0, 4)
        assert b[0].global_prompts == b[1].global_prompts == g.prompts == g.global_prompts
        assert b[0].prompts + b[1].prompts == g.prompts
        assert b[1].prompts == g.global_prompts[b[1].rows]
        for x in b:
            assert [mean_colour(s[0]) for s in x.global_sources] == [mean_colour(s[0]) for s in g.sources]
            assert [mean_colour(s[0]) for s in x.sources] == [mean_colour(s[0]) for s in g.sources[x.rows]]
    plain = next(data.train_iterator(ds, 4, seed=3, process_index=1, process_count=2))
    assert plain.global_sources == () and len(plain.sources) == 2      # global sources only when asked for


def test_state_restore_resumes_exactly(ds13):
    full = take(data.train_iterator(ds13, 4, seed=11), 10)
    it = data.train_iterator(ds13, 4, seed=11)
    take(it, 4)                                                        # crosses into epoch 1
    state = json.loads(json.dumps(it.state()))
    assert set(state) >= {"seed", "epoch", "position"} and state["epoch"] == 1
    resumed = data.train_iterator(ds13, 4, seed=0).restore(state)      # the seed comes from the state
    for want, got in zip(full[4:], take(resumed, 6)):
        assert got.indices.tolist() == want.indices.tolist() and got.prompts == want.prompts
        assert (got.epoch, got.position) == (want.epoch, want.position)
        assert all(np.array_equal(x, y) for x, y in zip(got.targets, want.targets))
    # resuming on two processes continues the same global stream
    halves = [data.train_iterator(ds13, 4, process_index=p, process_count=2).restore(state) for p in range(2)]
    for want in full[4:7]:
        assert next(halves[0]).indices.tolist() + next(halves[1]).indices.tolist() == want.indices.tolist()
    assert "groups_per_batch" in error_of(data.train_iterator(ds13, 2).restore, state)
    with pytest.warns(UserWarning):
        data.train_iterator(ds13, 2).restore(state, strict=False)


def test_eval_iterator_no_shuffle_no_drop(ds13):
    batches = list(data.eval_iterator(ds13, 4, load_images=False))
    assert len(batches) == 4
    assert np.concatenate([b.indices[b.valid] for b in batches]).tolist() == list(range(13))
    assert batches[-1].valid.tolist() == [True, False, False, False] and len(batches[-1].indices) == 4
    shards = [list(data.eval_iterator(ds13, 4, process_index=p, process_count=2, load_images=False))
              for p in range(2)]
    assert [len(s) for s in shards] == [4, 4]
    got = [i for b0, b1 in zip(*shards) for b in (b0, b1) for i in b.indices[b.valid].tolist()]
    assert got == list(range(13))
    big = list(data.eval_iterator(ds13, 16, load_images=False))       # one padded batch larger than the data
    assert len(big) == 1 and big[0].valid.sum() == 13
    assert "fewer than one global batch" in error_of(data.train_iterator, ds13, 16)


def test_a_large_dataset_says_that_its_images_are_checked(monkeypatch):
    """From `PROGRESS_FROM` images on, loading logs one line with the number of images before decoding them all;
    smaller datasets load silently."""
    lines = []
    data.load_dataset(os.path.join(ROOT, "data", "i2i"), "i2i", log=lines.append)
    assert lines == []
    monkeypatch.setattr(data, "PROGRESS_FROM", 10)
    ds = data.load_dataset(os.path.join(ROOT, "data", "i2i"), "i2i", log=lines.append)
    n = len({p for e in ds.examples for p in (e.target, *e.sources)})
    assert n >= 10 and len(lines) == 1 and f"checking {n} images" in lines[0] and "i2i/prompts.txt" in lines[0]
