import argparse
import re
import os

import pytest
import torch

import eit_fast
from eit_fast import CheckpointError, create_model, load_checkpoint, save_checkpoint
from eit_fast.checkpoint import atomic_save, save_safetensors


def fresh(name="eit_cifar", **kw):
    return create_model(name, **kw).eval()


def same_outputs(a, b):
    x = torch.randn(2, 3, a.cfg.img_size, a.cfg.img_size)
    with torch.no_grad():
        return torch.equal(a(x), b(x))


def write_authors_checkpoint(path, model, ema):
    """A file in the authors' training-checkpoint layout (docs/design.md section 1.4), DeiT-style contents."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300)
    args = argparse.Namespace(model="EIT16_4_3_Mini", batch_size=128, lr=5e-4, smoothing=0.1,
                              mixup=0.8, aa="rand-m9-mstd0.5-inc1", output_dir="", resume="", dist_url="env://",
                              input_size=224, drop_path=0.1, sched="cosine", epochs=300, repeated_aug=True)
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                "epoch": 299, "model_ema": ema.state_dict(),
                "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                           "growth_interval": 2000, "_growth_tracker": 17},
                "args": args}, path)


def test_authors_checkpoint_loads_and_gives_same_outputs(tmp_path):
    src, ema = fresh(), fresh()
    path = tmp_path / "checkpoint.pth"
    write_authors_checkpoint(path, src, ema)
    dst = fresh()
    assert not same_outputs(src, dst)
    obj = load_checkpoint(dst, path)
    assert same_outputs(src, dst)
    assert obj["epoch"] == 299 and obj["args"].model == "EIT16_4_3_Mini"
    dst_ema = fresh()
    load_checkpoint(dst_ema, path, use_ema=True)
    assert same_outputs(ema, dst_ema)


def test_authors_checkpoint_through_create_model(tmp_path):
    src = fresh()
    path = tmp_path / "checkpoint.pth"
    write_authors_checkpoint(path, src, fresh())
    assert same_outputs(src, create_model("eit_cifar", checkpoint_path=path).eval())


def test_bare_state_dict_with_ddp_and_compile_prefixes(tmp_path):
    src = fresh()
    path = tmp_path / "sd.pt"
    torch.save({f"module._orig_mod.{k}": v for k, v in src.state_dict().items()}, path)
    dst = fresh()
    load_checkpoint(dst, path)
    assert same_outputs(src, dst)


def test_own_checkpoint_and_safetensors_roundtrip(tmp_path):
    src = fresh()
    save_checkpoint(tmp_path / "own.pt", src, config=src.cfg.to_dict(), epoch=3)
    save_safetensors(tmp_path / "w.safetensors", src)
    a, b = fresh(), fresh()
    obj = load_checkpoint(a, tmp_path / "own.pt")
    load_checkpoint(b, tmp_path / "w.safetensors")
    assert obj["format"] == "eit_fast" and obj["epoch"] == 3 and obj["config"]["embed_dim"] == 250
    assert same_outputs(src, a) and same_outputs(src, b)
    assert sorted(os.listdir(tmp_path)) == ["own.pt", "w.safetensors"]  # no temporary left behind


def test_missing_key_is_named(tmp_path):
    sd = fresh().state_dict()
    del sd["blocks.2.eit_t.conv1.weight"]
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"missing keys \['blocks.2.eit_t.conv1.weight'\]"):
        load_checkpoint(fresh(), tmp_path / "sd.pt")


def test_unexpected_key_is_named(tmp_path):
    sd = fresh().state_dict()
    sd["pre_logits.fc.weight"] = torch.zeros(768, 250)
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['pre_logits.fc.weight'\]"):
        load_checkpoint(fresh(), tmp_path / "sd.pt")


def test_shape_mismatch_is_named_and_nothing_is_loaded(tmp_path):
    torch.save(fresh(num_classes=100).state_dict(), tmp_path / "sd.pt")
    dst = fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"head.weight: checkpoint \(100, 250\) vs model \(10, 250\)"):
        load_checkpoint(dst, tmp_path / "sd.pt")
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())


def test_checkpoint_of_another_model(tmp_path):
    torch.save(fresh().state_dict(), tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(create_model("vit_cifar"), tmp_path / "sd.pt")


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_unsafe_pickle_is_refused_not_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": fresh().state_dict(), "args": _Exploit()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="holds objects that are not safe to load"):
        load_checkpoint(fresh(), tmp_path / "evil.pth")
    assert not (tmp_path / "pwned").exists()


def test_truncated_file(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint(path, fresh())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(fresh(), path)


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"\x00not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(fresh(), tmp_path / "junk.pt")
    (tmp_path / "junk.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="is not a readable safetensors file"):
        load_checkpoint(fresh(), tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        load_checkpoint(fresh(), tmp_path / "nope.pt")


def test_non_tensor_contents(tmp_path):
    torch.save({"epoch": 3, "lr": 0.1}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="found no model weights"):
        load_checkpoint(fresh(), tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="has no 'model_ema' entry"):
        load_checkpoint(fresh(), tmp_path / "x.pt", use_ema=True)


def test_atomic_save_keeps_the_old_file_when_a_write_dies(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, fresh(), epoch=1)
    good = path.read_bytes()

    def dies_mid_write(tmp):
        with open(tmp, "wb") as f:
            f.write(good[:100])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_save(dies_mid_write, path)
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["last.pt"]
    assert eit_fast.load_checkpoint(fresh(), path)["epoch"] == 1


# --- issue 9: nothing half-loaded, nothing silently cast, corruption detected ---------------------------------

def flip_middle(path, nbytes=4096):
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + nbytes] = bytes(b ^ 0xFF for b in data[mid:mid + nbytes])
    path.write_bytes(bytes(data))


def test_own_checkpoint_with_flipped_bytes_is_refused(tmp_path):
    path = tmp_path / "own.pt"
    save_checkpoint(path, fresh(), epoch=1)
    flip_middle(path)
    torch.load(path, weights_only=True)  # torch alone does not notice
    with pytest.raises(CheckpointError, match="is corrupt: its contents do not match the checksum"):
        load_checkpoint(fresh(), path)


def test_safetensors_export_with_flipped_bytes_is_refused(tmp_path):
    path = tmp_path / "w.safetensors"
    save_safetensors(path, fresh(), {"note": "x"})
    flip_middle(path)
    with pytest.raises(CheckpointError, match="is corrupt: its contents do not match the checksum"):
        load_checkpoint(fresh(), path)


def test_safetensors_metadata_edit_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from eit_fast.checkpoint import read_safetensors_metadata
    path = tmp_path / "w.safetensors"
    save_safetensors(path, fresh(), {"classes": '["a", "b"]'})
    meta = read_safetensors_metadata(path)
    save_file(load_file(str(path)), str(path), metadata={**meta, "classes": '["b", "a"]'})
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(fresh(), path)
    del meta["checksum"]
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(CheckpointError, match="without its checksum"):
        load_checkpoint(fresh(), path)


def unchanged(model, before):
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("make, message", [
    (lambda t: t.to_sparse(), "unusable layouts .*torch.sparse_coo"),
    (lambda t: t.to(torch.int8), "unusable dtypes .*torch.int8 for a torch.float32 parameter"),
    (lambda t: t.bool(), "unusable dtypes .*torch.bool for a torch.float32 parameter"),
    (lambda t: t.to(torch.complex64), "unusable dtypes .*torch.complex64 for a torch.float32 parameter"),
])
def test_unusable_tensors_are_refused_before_anything_loads(tmp_path, make, message):
    src = fresh()
    sd = src.state_dict()
    sd["head.weight"] = make(sd["head.weight"])   # last in order: everything before it would load first
    torch.save(sd, tmp_path / "sd.pt")
    dst = fresh()
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(dst, tmp_path / "sd.pt")
    assert unchanged(dst, before)


def test_half_precision_weights_still_load(tmp_path):
    src = fresh()
    torch.save({k: v.half() for k, v in src.state_dict().items()}, tmp_path / "sd.pt")
    dst = fresh()
    load_checkpoint(dst, tmp_path / "sd.pt")
    assert torch.equal(dst.head.weight, src.head.weight.half().float())


def test_a_load_that_fails_midway_leaves_the_model_unchanged(tmp_path, monkeypatch):
    src, dst = fresh(), fresh()
    torch.save(src.state_dict(), tmp_path / "sd.pt")
    before = {k: v.clone() for k, v in dst.state_dict().items()}

    def half_then_fail(self, sd, strict=True):
        with torch.no_grad():
            for k, v in list(self.state_dict().items())[:5]:
                v.copy_(sd[k])
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(torch.nn.Module, "load_state_dict", half_then_fail)
    with pytest.raises(CheckpointError, match="simulated failure.*the model is unchanged"):
        load_checkpoint(dst, tmp_path / "sd.pt")
    assert unchanged(dst, before)


def test_duplicate_keys_after_prefix_stripping_are_refused(tmp_path):
    sd = fresh().state_dict()
    sd["module.head.bias"] = torch.ones_like(sd["head.bias"])
    torch.save(sd, tmp_path / "sd.pt")
    with pytest.raises(CheckpointError, match=r"entries 'head.bias' and 'module.head.bias' are both the parameter"):
        load_checkpoint(fresh(), tmp_path / "sd.pt")


def test_messages_for_bad_files(tmp_path):
    (tmp_path / "random.pt").write_bytes(bytes(range(256)) * 20)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(fresh(), tmp_path / "random.pt")
    assert "weights_only" not in str(e.value) and "not a readable checkpoint" in str(e.value)
    (tmp_path / "raw.pkl").write_bytes(__import__("pickle").dumps({"x": _Exploit()}))
    with pytest.raises(CheckpointError, match=r"not safe to load \(GLOBAL posix.system\)"):
        load_checkpoint(fresh(), tmp_path / "raw.pkl")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pt is empty \(0 bytes\)"):
        load_checkpoint(fresh(), tmp_path / "empty.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a checkpoint file"):
        load_checkpoint(fresh(), tmp_path)


def test_another_models_weights_give_a_short_summary(tmp_path):
    torch.save(create_model("eit_mini").state_dict(), tmp_path / "mini.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(create_model("eit_tiny"), tmp_path / "mini.pt")
    msg = str(e.value)
    assert len(msg) < 1500, len(msg)
    assert re.search(r"missing keys \[.*\] and \d+ more", msg) and re.search(r"shape mismatches \[.*\] and \d+ more", msg)
