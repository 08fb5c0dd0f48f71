"""`compress.prune`: structural pruning (and/or sparsity masks) with recovery, exported and measured."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from compress.core import check_onnx_output
from compress.data import DataOptions, data_opts_of, user_data
from compress.models import load_model, model_inputs, prepare_inputs, require_one_input_source, shape_args
from compress.pruning import SPARSITY_NOTE, PruneOptions, get_importance, prune_stage, zipped_size
from compress.report import ExportedFile, PruneMeasured, PruneReport
from devices import DeviceProfile, load_profile
from export import export_onnx
from runtime import device_latency


def prune(model: str, *, output: Union[str, Path], weights: Optional[str] = None,
          input_shape: Union[str, Sequence[str]] = (), calib: Optional[str] = None, max_calib: Optional[int] = None,
          ratio: Optional[float] = None, importance: str = PruneOptions.default("importance"),
          allocation: str = PruneOptions.default("allocation"), global_pruning: bool = False,
          ignore: Sequence[str] = (), prune_first_conv: bool = PruneOptions.default("prune_first_conv"),
          round_to: Optional[int] = None, device: str = "host", sparsity: Optional[float] = None,
          pattern: str = PruneOptions.default("pattern"), no_recover: bool = False,
          recover_steps: int = PruneOptions.default("recover_steps"),
          recover_seconds: float = PruneOptions.default("recover_seconds"), finetune: Optional[str] = None,
          no_measure: bool = False, image_size: Optional[str] = None, crop_pct: Optional[float] = None,
          mean: Optional[str] = None, std: Optional[str] = None, interpolation: Optional[str] = None,
          seq_len: Optional[int] = None, tokenizer: Optional[str] = None, column: Optional[str] = None,
          label_column: str = DataOptions.default("label_column"), skip_bad: bool = False,
          on_stage: Optional[Callable[[str], None]] = None) -> PruneReport:
    """Prune MODEL (FILE.py:factory, package.module:factory or a Hugging Face folder), recover it, export it to
    OUTPUT (.onnx) and measure it beside the original; the compress.report.PruneReport (`structural` params and
    MACs before/after, `fidelity` to the original, `measured` latency A/B, `onnx`).

    Keyword arguments are `compress prune`'s options (`global_pruning=True` for --global, `no_recover=True` for
    --no-recover, `input_shape` one string or a list), with its defaults; `round_to` None: the device's channel
    multiple. `on_stage(text)` hears what it is doing; None: nothing is reported.

        >>> import compress
        >>> p = compress.prune("compress.zoo:resnet_tiny", input_shape="1,3,32,32", ratio=0.5, output="p.onnx")
        >>> p.structural["macs_ratio"], p.fidelity.cosine_mean, p.measured.latency["speedup_wall"]
    """
    say = on_stage or (lambda s: None)
    shapes = shape_args(input_shape)
    require_one_input_source(shapes, calib)
    out = check_onnx_output(str(output), [model, weights, calib, device, finetune])
    opts = PruneOptions(ratio=ratio, importance=importance, allocation=allocation, global_pruning=global_pruning,
                        ignore=list(ignore), prune_first_conv=prune_first_conv, round_to=round_to, sparsity=sparsity,
                        pattern=pattern, recover=not no_recover, recover_steps=recover_steps,
                        recover_seconds=recover_seconds, finetune=finetune, real_data=calib is not None)
    opts.check()
    get_importance(importance)  # an unknown criterion fails before the model is loaded
    profile = load_profile(device)
    if opts.round_to is None and opts.ratio is not None:
        opts.round_to = profile.pruning.channel_multiple
    dopts = data_opts_of(locals())
    say("loading model")
    loaded = load_model(model, weights)
    with user_data(model_inputs(loaded, shapes), dopts, out.absolute().parent, calib, max_calib=max_calib) as data:
        say("preparing inputs")
        prep = prepare_inputs(loaded, shapes, data.calib, max_samples=max_calib)
        data.describe(prep.info)
        pruned, stage = prune_stage(loaded.module, prep, opts, on_stage=say)
        say("exporting")
        written = export_onnx(pruned, prep.example, out, opset=profile.opset, source=model,
                              extra_meta={"weights": weights, "pruning": {
                                  "ratio": ratio, "sparsity": sparsity, "pattern": pattern, "importance": importance,
                                  "round_to": opts.round_to}})
        measured = None
        if not no_measure or sparsity is not None:
            measured = _measure(loaded.module, prep.example, out, profile, sparsity is not None, no_measure, say)
    notes = {"model_notes": loaded.notes} if loaded.notes else {}
    return PruneReport(**{k: getattr(stage, k) for k in stage.model_fields_set}, calibration=prep.info, **notes,
                       device=profile.name, measured=measured,
                       onnx=ExportedFile(path=str(written.path), size_bytes=written.size_bytes, parity=written.parity,
                                         exporter=written.exporter))


def _measure(original: Any, example: dict[str, Any], pruned_path: Path, profile: DeviceProfile, sparse: bool,
             no_latency: bool, say: Callable[[str], None]) -> PruneMeasured:
    """Export the original beside the result and compare sizes (zipped, for sparsity) and latency A/B."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "original.onnx"
        say("exporting the original for comparison")
        export_onnx(original, example, base, opset=profile.opset)
        m = PruneMeasured(size_bytes={"original": base.stat().st_size, "pruned": pruned_path.stat().st_size})
        if sparse:
            m.zipped_bytes = {"original": zipped_size(base), "pruned": zipped_size(pruned_path)}
            m.note = SPARSITY_NOTE
        if not no_latency:
            say(f"timing original vs pruned on {profile.name}")
            feeds = {k: v.numpy() for k, v in example.items()}
            m.latency = device_latency({"original": base, "pruned": pruned_path}, profile, feeds).to_json()
    return m
