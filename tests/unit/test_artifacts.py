"""Model artifacts: safetensors + config, written atomically, sha256 recorded, loaded back identically."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from app.distill.architectures import build_model
from app.distill.artifacts import ArtifactError, load_model_dir, save_model_dir, verify_files
from app.distill.spec import MLPArchitecture

ARCH = MLPArchitecture(input_dim=10, hidden_dims=[25], output_dim=5)


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = build_model(ARCH, seed=1)
    model.set_input_normalization(torch.arange(10.0), torch.full((10,), 2.0))
    files = save_model_dir(model, tmp_path / "m")
    loaded = load_model_dir(tmp_path / "m")
    x = torch.randn(7, 10)
    assert torch.equal(model.eval()(x), loaded(x))
    assert torch.equal(loaded.input_mean, torch.arange(10.0))
    assert {f.path for f in files} == {"config.json", "model.safetensors"}
    for f in files:
        data = (tmp_path / "m" / f.path).read_bytes()
        assert f.sha256 == hashlib.sha256(data).hexdigest() and f.size_bytes == len(data)
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["architecture"]["hidden_dims"] == [25] and config["num_classes"] == 5


def test_weights_are_safetensors_not_pickle(tmp_path: Path) -> None:
    save_model_dir(build_model(ARCH), tmp_path / "m")
    raw = (tmp_path / "m" / "model.safetensors").read_bytes()
    header_length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_length])
    assert "layers.0.weight" in header
    assert b"\x80\x04" not in raw[:2]  # no pickle protocol marker


def test_failed_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from app.distill import artifacts

    def broken(*_: object, **__: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_model_dir(build_model(ARCH), tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_existing_destination_is_never_overwritten(tmp_path: Path) -> None:
    save_model_dir(build_model(ARCH, seed=1), tmp_path / "m")
    with pytest.raises(ArtifactError):
        save_model_dir(build_model(ARCH, seed=2), tmp_path / "m")


def test_corrupt_or_mismatched_weights_are_rejected(tmp_path: Path) -> None:
    save_model_dir(build_model(ARCH), tmp_path / "m")
    config_path = tmp_path / "m" / "config.json"
    config = json.loads(config_path.read_text())
    config["architecture"]["hidden_dims"] = [26]
    config_path.write_text(json.dumps(config))
    with pytest.raises((ArtifactError, RuntimeError)):
        load_model_dir(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match=r"model\.safetensors"):
        load_model_dir(tmp_path / "m")


def flip_last_byte(path: Path) -> None:
    """One bit of the last weight changed: the file is the same size and still a valid safetensors file."""
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


def test_verify_files_finds_a_flipped_bit_a_truncation_and_a_missing_file(tmp_path: Path) -> None:
    files = [
        {"path": f.path, "size_bytes": f.size_bytes, "sha256": f.sha256}
        for f in save_model_dir(build_model(ARCH), tmp_path / "m")
    ]
    verify_files(tmp_path / "m", files)  # as written: nothing to say
    weights = tmp_path / "m" / "model.safetensors"
    pristine = weights.read_bytes()
    flip_last_byte(weights)
    load_model_dir(tmp_path / "m")  # the loader alone cannot tell: the flipped weights load
    with pytest.raises(ArtifactError, match=r"model\.safetensors does not match its recorded sha256"):
        verify_files(tmp_path / "m", files)
    weights.write_bytes(pristine[:-4])
    with pytest.raises(ArtifactError, match=rf"model\.safetensors is {len(pristine) - 4} bytes, not the"):
        verify_files(tmp_path / "m", files)
    weights.write_bytes(pristine)
    verify_files(tmp_path / "m", files)
    (tmp_path / "m" / "config.json").unlink()
    with pytest.raises(ArtifactError, match=r"config\.json is missing"):
        verify_files(tmp_path / "m", files)


def test_a_tokenizer_config_may_name_files_of_its_folder_only() -> None:
    from app.models.service import outside_reference

    names = ["config.json", "tokenizer_config.json", "vocab.txt", "merges.txt", "spm.model"]
    for reference in ("/etc/passwd", "~/.ssh/id_rsa", "../secret.txt", "sub/../../x", "C:\\x", "secret.txt", "data/x"):
        assert outside_reference({"vocab_file": reference}, names) == ("vocab_file", reference)
        assert outside_reference({"vocab": reference}, names) == ("vocab", reference)  # relative: the server's cwd
    assert outside_reference({"extra_files": ["spm.model", "x.txt"]}, names) == ("extra_files.1", "x.txt")
    assert outside_reference({"kwargs": {"paths": ["ok.txt", "/etc/hosts"]}}, names) == ("kwargs.paths.1", "/etc/hosts")
    # tokens are any text, where the model was saved from is never opened, a template is text, and an inline
    # vocabulary or merges list holds tokens
    saved = {
        "name_or_path": "/home/me/model",
        "special_tokens_map_file": "/Users/me/.cache/huggingface/hub/snapshots/abc/special_tokens_map.json",
        "bos_token": "/",
        "additional_special_tokens": ["~", "../"],
        "added_tokens_decoder": {"5": {"content": "/usr"}},
        "chat_template": "{{ '../' }}",
        "vocab_file": "vocab.txt",
        "merges_file": "merges.txt",
        "tokenizer_file": None,
        "vocab": {"/": 0, "..": 1},
        "merges": ["../ x", "/ a"],
    }
    assert outside_reference(saved, names) is None


def test_model_facts_keep_only_whole_numbers_in_range(tmp_path: Path) -> None:
    from app.distill.artifacts import transformers_facts

    config = {"model_type": "t5", "num_layers": "x", "d_model": 10**30, "vocab_size": 512, "n_layer": True}
    (tmp_path / "config.json").write_text(json.dumps(config))
    facts = transformers_facts(tmp_path)
    assert (facts["model_type"], facts["num_layers"], facts["hidden_size"], facts["vocab_size"]) == (
        "t5",
        None,
        None,
        512,
    )
