"""``dorafit export RUN --format peft --out DIR``: a run's adapter as a PEFT adapter folder.

RUN is a run folder written by ``dorafit train`` (its adapter is ``RUN/adapter``) or an adapter folder written by
``dorafit.save_adapter``. The folder written loads with ``PeftModel.from_pretrained(base_model, DIR)`` (and so in
the tools that read PEFT adapters); see :mod:`dorafit.peft_format` for what can be expressed.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from .common import add_compute_arguments, use_threads
from .merge import add_dtype_argument

FORMATS = ("peft",)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export", help="write a run's adapter in the PEFT library's format",
        description="Write a run's adapter (or a dorafit adapter folder) as adapter_config.json + "
        "adapter_model.safetensors, exactly as the PEFT library writes them (LoRA, rsLoRA, DoRA; VeRA when all its "
        "layers share one shape). For a run folder the export is then loaded with PEFT (when installed) and its "
        "outputs are compared with dorafit's on a few test examples.",
    )
    parser.add_argument("run", metavar="RUN", help="a run folder written by dorafit train, or an adapter folder "
                        "written by dorafit.save_adapter")
    parser.add_argument("--format", choices=FORMATS, default="peft", help="the format to write (default: peft)")
    parser.add_argument("--out", metavar="DIR", required=True, help="the folder to write (must not exist or be empty)")
    parser.add_argument("--base-model", metavar="NAME|DIR", default=None,
                        help="for an adapter folder: the base model it belongs to, a preset, a local transformers "
                        "folder or a Hub id ORG/NAME[@REVISION] (default: the base model saved with the adapter)")
    parser.add_argument("--name", metavar="NAME", default=None,
                        help="base_model_name_or_path to write, e.g. a Hub id (default: the run's Hub id, else the "
                        "base model's folder)")
    add_dtype_argument(parser)
    parser.add_argument("--check", type=int, default=8, metavar="N",
                        help="for a run folder: compare PEFT's outputs with dorafit's on N test examples (0: skip; "
                        "default: 8)")
    add_compute_arguments(parser, device="cpu")
    parser.set_defaults(func=main)


def _load_base(folder: Path, saved_on: dict):
    """The base model an adapter was saved on: the class (and classifier labels) its adapter_config.json records,
    else the class the folder's config.json names (float32, no network)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(folder, local_files_only=True)
    names = [saved_on["class"]] if saved_on.get("class") else getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else None
    kw = {}
    if saved_on.get("id2label"):
        labels = {int(k): v for k, v in saved_on["id2label"].items()}
        kw = dict(num_labels=len(labels), id2label=labels, label2id={v: k for k, v in labels.items()})
    torch.manual_seed(0)  # a head the folder lacks is replaced by the adapter's saved head
    return (cls or transformers.AutoModel).from_pretrained(folder, local_files_only=True, dtype=torch.float32,
                                                           **kw).eval()


def _adapted_from_adapter_folder(folder: Path, base_model: str | None):
    from ..io import load_adapter, read_adapter
    from ..train.models import resolve_model

    meta, _ = read_adapter(folder)
    base = base_model or meta.get("base_model")
    if not base:
        raise ValueError(f"the adapter in {folder} does not record its base model; name it with --base-model")
    model = _load_base(resolve_model(base), meta.get("model") or {})
    load_adapter(model, folder)
    return model


def _tolerance(setup_dtype: str, logits) -> float:
    """The largest |logit difference| PEFT's outputs may have from dorafit's: 1e-3 over a float32 base; over a
    bfloat16 / float16 base (``--dtype``, resolved) PEFT rounds its products differently, so 2% of the logits' size
    (at least 1), as a bfloat16 value's 8 bits of mantissa allow."""
    if setup_dtype not in ("bfloat16", "float16"):
        return 1e-3
    return 0.02 * max(1.0, float(logits.abs().max()))


def _check_with_peft(setup, out: Path, n: int) -> None:
    """Load the export with PEFT on the run's base model and compare outputs on ``n`` test examples."""
    try:
        from peft import PeftModel
    except ImportError:
        print("not checked: the peft package is not installed (pip install peft)")
        return
    from ..inject import unload
    from ..peft_format import peft_deprecation_quiet
    from ..train import precision
    from ..train.merge import check_examples

    examples = check_examples(setup, n)
    if not examples:
        return
    ours = setup.task.check_outputs(setup.model.eval(), examples, setup.device)
    with peft_deprecation_quiet():
        theirs_model = PeftModel.from_pretrained(unload(copy.deepcopy(setup.model)), out).eval()
    theirs = setup.task.check_outputs(theirs_model, examples, setup.device)
    diff = float((ours - theirs).abs().max())
    dtype = precision.resolve(setup.cfg.dtype, setup.device, setup.cfg.method)
    tolerance = _tolerance(dtype, ours)
    # a prediction differs where PEFT's choice is worse than ours by more than the tolerance (bfloat16 logits tie)
    margin = ours.max(-1).values - ours.gather(-1, theirs.argmax(-1, keepdim=True)).squeeze(-1)
    differ = int(((ours.argmax(-1) != theirs.argmax(-1)) & (margin > tolerance)).sum())
    if differ or diff > tolerance:
        raise ValueError(f"PEFT's outputs for the export in {out} differ from dorafit's (max |logit difference| "
                         f"{diff:.3g}, {differ} of {len(examples)} predictions differ)")
    print(f"checked: PEFT's outputs equal dorafit's on {len(examples)} test examples "
          f"(max |logit difference| {diff:.2g})")


def main(args: argparse.Namespace) -> int:
    from ..train.errors import report_errors

    def command() -> int:
        from ..io import CONFIG_FILE
        from ..peft_format import export_peft
        from ..train import hub, rundir
        from ..train.setup import load_trained

        run, out = Path(args.run), Path(args.out)
        if out.exists() and (not out.is_dir() or any(out.iterdir())):
            raise ValueError(f"{out} exists and is not an empty folder; choose another --out or remove it")
        setup = None
        if (run / rundir.CONFIG).is_file():
            setup = load_trained(run, args.device, args.threads, args.dtype)
            if setup.cfg.method == "full":
                raise ValueError(f"{run} is a full fine-tuning run: it has no adapter to export (dorafit merge "
                                 "writes its model)")
            model, name = setup.model, args.name or hub.repo_of(setup.cfg.model) or str(setup.loaded.folder)
            revision = None if args.name else hub.revision_of(setup.cfg.model)  # the commit it trained on
        elif (run / CONFIG_FILE).is_file():
            use_threads(args)  # exported as saved: no model runs on --device
            model = _adapted_from_adapter_folder(run, args.base_model)
            name, revision = args.name, None
        else:
            raise ValueError(f"{run} is neither a run folder ({rundir.CONFIG} and {rundir.ADAPTER}/) nor an adapter "
                             f"folder ({CONFIG_FILE}); give a folder written by dorafit train or dorafit.save_adapter")
        export_peft(model, out, base_model=name, revision=revision)
        if setup is not None and args.check > 0:
            _check_with_peft(setup, out, args.check)
        print(f"PEFT adapter folder: {out.resolve()}")
        return 0

    return report_errors(command)
