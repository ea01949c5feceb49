"""Throwaway untrained bundles for developing and timing the serving benchmarks.

`python -m bench.devbundle --out runs/bench-dev/k4 --k 4 [--arch linear|iresnet]` writes a
complete bundle (f.onnx, heads/*.onnx, encoders/enc_0.onnx, parm.onnx, manifest.json):

- `linear` (default): `onnx.helper` only, no torch: f is a random orthogonal map of the
  flattened image, so the encoder `sum_j c_j x_j` is *exact* and coded answers equal
  uncoded ones. One (D x D) matmul per query: for exercising the harness only.
- `iresnet`: the project's real architectures, randomly initialised (f and heads of
  `python -m trainer classifier --preset cpu`, the `UNetEncoder` of `python -m trainer
  encoder --preset cpu` (base 16 channels, 1 shared level), ParM with f's
  architecture), exported like `python -m export` does. Its answers are meaningless but its
  compute time is the trained model's, so latency/overhead figures for k values that have
  no trained bundle can be measured on it (say so next to every such figure).
"""

from __future__ import annotations

import argparse
import logging
import math
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

OPSET = 18


def _save(model: object, path: Path) -> None:
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def _graph(nodes: list, name: str, inputs: list, outputs: list, inits: dict[str, np.ndarray]):
    import onnx
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        nodes, name, inputs, outputs, [numpy_helper.from_array(v, k) for k, v in inits.items()]
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=onnx.IR_VERSION)


def build_linear_bundle(out_dir: str | Path, k: int, shape: tuple[int, int, int] = (1, 28, 28),
                        num_classes: int = 10, seed: int = 0) -> Path:
    """Write a linear (n=k+1, c=1/k) bundle to `out_dir`; returns the directory."""
    from onnx import TensorProto, helper

    from runtime.manifest import Manifest, sha256_file

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    d = math.prod(shape)
    w_f, _ = np.linalg.qr(rng.standard_normal((d, d)))  # orthogonal: f is a bijection
    w_f = w_f.astype(np.float32)  # (D, D)
    w_h = (rng.standard_normal((d, num_classes)) / math.sqrt(d)).astype(np.float32)  # (D, classes)
    b_h = rng.standard_normal(num_classes).astype(np.float32)
    coeffs = np.full(k, 1.0 / k, dtype=np.float32)
    x_img = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", *shape])
    x_grp = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", k, *shape])
    flat = np.array([-1, d], dtype=np.int64)
    emb = np.array([-1, *shape], dtype=np.int64)

    f = _graph(
        [helper.make_node("Reshape", ["x", "flat"], ["xf"]),
         helper.make_node("MatMul", ["xf", "w"], ["zf"]),
         helper.make_node("Reshape", ["zf", "emb"], ["z"])],
        "f", [x_img], [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", *shape])],
        {"flat": flat, "w": w_f, "emb": emb},
    )
    head = _graph(
        [helper.make_node("Reshape", ["z", "flat"], ["zf"]),
         helper.make_node("Gemm", ["zf", "w", "b"], ["logits"])],
        "head", [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        {"flat": flat, "w": w_h, "b": b_h},
    )
    enc = _graph(  # sum_j c_j x_j, exact for linear f
        [helper.make_node("Mul", ["x", "c"], ["xc"]),
         helper.make_node("ReduceSum", ["xc", "axis"], ["x_parity"], keepdims=0)],
        "enc_0", [x_grp], [helper.make_tensor_value_info("x_parity", TensorProto.FLOAT, ["batch", *shape])],
        {"c": coeffs.reshape(1, k, 1, 1, 1), "axis": np.array([1], dtype=np.int64)},
    )
    parm = _graph(  # sum_j head(f(x_j)) = (sum_j x_j) W_f W_h + k b
        [helper.make_node("ReduceSum", ["x", "axis"], ["xs"], keepdims=0),
         helper.make_node("Reshape", ["xs", "flat"], ["xsf"]),
         helper.make_node("Gemm", ["xsf", "w", "b"], ["logits_sum"])],
        "parm", [x_grp], [helper.make_tensor_value_info("logits_sum", TensorProto.FLOAT, ["batch", num_classes])],
        {"axis": np.array([1], dtype=np.int64), "flat": flat, "w": (w_f @ w_h).astype(np.float32),
         "b": (k * b_h).astype(np.float32)},
    )
    files = {"f.onnx": f, "heads/digit.onnx": head, "encoders/enc_0.onnx": enc, "parm.onnx": parm}
    for rel, model in files.items():
        _save(model, out / rel)
    manifest = Manifest.from_dict({
        "schema_version": 1,
        "model_name": "mnist-iresnet",
        "input": {"name": "INPUT", "shape": list(shape), "accepted_dtypes": ["UINT8", "FP32"],
                  "preprocessing": {"mean": [0.1307] * shape[0], "std": [0.3081] * shape[0]}},
        "embedding_shape": list(shape),
        "f": "f.onnx",
        "heads": [{"task": "digit", "file": "heads/digit.onnx",
                   "classes": [str(i) for i in range(num_classes)]}],
        "coding": {"n": k + 1, "k": k, "coefficients": [[1.0 / k] * k]},
        "encoders": [{"row": 0, "file": "encoders/enc_0.onnx"}],
        "parm": "parm.onnx",
        "files": {rel: sha256_file(out / rel) for rel in files},
        "provenance": {"commands": [f"python -m bench.devbundle --out {out} --k {k} --seed {seed}"],
                       "note": "linear throwaway bundle for benchmark development; not a trained model"},
    })
    manifest.dump(out)
    logger.info("wrote linear dev bundle k=%d to %s", k, out)
    return out


def export_module(module, sample_shape: tuple[int, ...], path: Path, input_name: str, output_name: str) -> Path:
    """Export like `python -m export` (export.onnx_export), or directly with torch.onnx."""
    try:
        from export.onnx_export import export_onnx
    except ImportError:  # export not installed: same exporter settings, without its checks
        import torch

        path.parent.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            torch.onnx.export(module.eval(), (torch.zeros(2, *sample_shape),), str(path),
                              input_names=[input_name], output_names=[output_name],
                              dynamic_shapes=({0: torch.export.Dim("batch")},), opset_version=OPSET,
                              dynamo=True, external_data=False)
        return path
    return export_onnx(module, sample_shape, path, input_name=input_name, output_name=output_name)


# The encoder of `python -m trainer encoder --preset cpu` (the shipped bundle's budget).
CPU_PRESET_ENCODER = {"base_channels": 16, "depth": 2, "shared_levels": 1}


def build_iresnet_bundle(out_dir: str | Path, k: int, seed: int = 0,
                         encoder: dict[str, int] | None = None) -> Path:
    """Untrained real-architecture (n=k+1, c=1/k) MNIST bundle: timing-faithful, answers meaningless."""
    import torch

    from runtime.manifest import Manifest, sha256_file
    from trainer.data import get_spec
    from trainer.models import Classifier, ClassifierConfig, default_heads
    from trainer.models.encoder import EncoderConfig, UNetEncoder
    from trainer.models.parm import ParityModel, ParMConfig
    from trainer.train_classifier import preset_values

    out = Path(out_dir)
    torch.manual_seed(seed)
    spec = get_spec("mnist")
    f_cfg, train = preset_values("mnist", "cpu")
    cfg = ClassifierConfig(f=f_cfg, heads=default_heads("mnist", spec.class_names, train["pool_size"]),
                           dataset="mnist")
    model = Classifier(cfg).eval()
    shape = tuple(spec.image_shape)
    emb = tuple(f_cfg.embedding_shape)
    f = model.f.folded()
    files = {"f.onnx": export_module(f, shape, out / "f.onnx", "x", "z")}
    heads = []
    for h in cfg.heads:
        rel = f"heads/{h.task}.onnx"
        files[rel] = export_module(model.heads[h.task], emb, out / rel, "z", "logits")
        heads.append({"task": h.task, "file": rel, "classes": list(h.class_names)})
    enc_cfg = EncoderConfig(in_channels=shape[0], image_size=list(shape[1:]), k=k, coefficients=[[1.0 / k] * k],
                            **(CPU_PRESET_ENCODER if encoder is None else encoder))
    files["encoders/enc_0.onnx"] = export_module(UNetEncoder(enc_cfg, 0), (k, *shape),
                                                 out / "encoders/enc_0.onnx", "x", "x_parity")
    parm = ParityModel(ParMConfig(k=k, classifier=cfg.to_dict()), Classifier(cfg)).eval()
    parm.f = parm.f.folded()
    files["parm.onnx"] = export_module(parm, (k, *shape), out / "parm.onnx", "x", "logits_sum")
    manifest = Manifest.from_dict({
        "schema_version": 1,
        "model_name": "mnist-iresnet",
        "input": {"name": "INPUT", "shape": list(shape), "accepted_dtypes": ["UINT8", "FP32"],
                  "preprocessing": {"mean": list(spec.mean), "std": list(spec.std)}},
        "embedding_shape": list(emb),
        "f": "f.onnx",
        "heads": heads,
        "coding": {"n": k + 1, "k": k, "coefficients": [[1.0 / k] * k]},
        "encoders": [{"row": 0, "file": "encoders/enc_0.onnx"}],
        "parm": "parm.onnx",
        "files": {rel: sha256_file(out / rel) for rel in files},
        "provenance": {"commands": [f"python -m bench.devbundle --arch iresnet --out {out} --k {k} --seed {seed}"],
                       "note": "UNTRAINED real-architecture bundle (random init) for timing only",
                       "f_config": f_cfg.to_dict(), "encoder_config": enc_cfg.to_dict()},
    })
    manifest.dump(out)
    logger.info("wrote untrained i-ResNet dev bundle k=%d to %s", k, out)
    return out


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    p = argparse.ArgumentParser(prog="python -m bench.devbundle", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arch", choices=("linear", "iresnet"), default="linear")
    args = p.parse_args(argv)
    if args.k < 1:
        p.error(f"--k must be >= 1, got {args.k}")
    if args.arch == "linear":
        build_linear_bundle(args.out, args.k, seed=args.seed)
    else:
        build_iresnet_bundle(args.out, args.k, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
