"""Throwaway untrained bundles for developing and timing the serving benchmarks.

`python -m bench.devbundle --out runs/bench-dev/k4 --k 4 [--arch linear|iresnet]` writes a
complete bundle of one code (f.onnx, heads/*.onnx, codes/n<k+1>k<k>/enc_0.onnx and parm.onnx,
manifest.json):

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

from export.layout import MIN_OPSET
from runtime.manifest import (
    ACCEPTED_DTYPES,
    BATCH_DIM,
    ENCODER_IO,
    F_FILE,
    F_IO,
    HEAD_IO,
    INPUT_NAME,
    PARM_IO,
    SCHEMA_VERSION,
    code_encoder_file,
    code_parm_file,
    head_file,
)

logger = logging.getLogger(__name__)

OPSET = MIN_OPSET
TASK = "digit"  # the linear bundle's one head


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


def _manifest_data(k: int, shape: tuple[int, ...], embedding_shape: list[int], mean: list[float],
                   std: list[float], heads: list[dict], provenance: dict, files: dict[str, str]) -> dict:
    """manifest.json of a dev bundle: n = k + 1, c = 1/k, one encoder and ParM."""
    return {
        "schema_version": SCHEMA_VERSION,
        "model_name": "mnist-iresnet",
        "input": {"name": INPUT_NAME, "shape": list(shape), "accepted_dtypes": list(ACCEPTED_DTYPES),
                  "preprocessing": {"mean": mean, "std": std}},
        "embedding_shape": embedding_shape,
        "f": F_FILE,
        "heads": heads,
        "codes": [{"n": k + 1, "k": k, "coefficients": [[1.0 / k] * k],
                   "encoders": [{"row": 0, "file": code_encoder_file(k + 1, k, 0)}],
                   "parm": code_parm_file(k + 1, k)}],
        "files": files,
        "provenance": provenance,
    }


def build_linear_bundle(out_dir: str | Path, k: int, shape: tuple[int, int, int] = (1, 28, 28),
                        num_classes: int = 10, seed: int = 0) -> Path:
    """Write a linear (n=k+1, c=1/k) bundle to `out_dir`; returns the directory."""
    from onnx import TensorProto, helper

    from runtime.manifest import Manifest, sha256_file

    (x_name, z_name), (_, logits), (_, x_parity), (_, logits_sum) = F_IO, HEAD_IO, ENCODER_IO, PARM_IO
    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    d = math.prod(shape)
    w_f, _ = np.linalg.qr(rng.standard_normal((d, d)))  # orthogonal: f is a bijection
    w_f = w_f.astype(np.float32)  # (D, D)
    w_h = (rng.standard_normal((d, num_classes)) / math.sqrt(d)).astype(np.float32)  # (D, classes)
    b_h = rng.standard_normal(num_classes).astype(np.float32)
    coeffs = np.full(k, 1.0 / k, dtype=np.float32)
    x_img = helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [BATCH_DIM, *shape])
    x_grp = helper.make_tensor_value_info(x_name, TensorProto.FLOAT, [BATCH_DIM, k, *shape])
    z_val = helper.make_tensor_value_info(z_name, TensorProto.FLOAT, [BATCH_DIM, *shape])
    flat = np.array([-1, d], dtype=np.int64)
    emb = np.array([-1, *shape], dtype=np.int64)

    f = _graph(
        [helper.make_node("Reshape", [x_name, "flat"], ["xf"]),
         helper.make_node("MatMul", ["xf", "w"], ["zf"]),
         helper.make_node("Reshape", ["zf", "emb"], [z_name])],
        "f", [x_img], [z_val], {"flat": flat, "w": w_f, "emb": emb},
    )
    head = _graph(
        [helper.make_node("Reshape", [z_name, "flat"], ["zf"]),
         helper.make_node("Gemm", ["zf", "w", "b"], [logits])],
        "head", [z_val], [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [BATCH_DIM, num_classes])],
        {"flat": flat, "w": w_h, "b": b_h},
    )
    enc = _graph(  # sum_j c_j x_j, exact for linear f
        [helper.make_node("Mul", [x_name, "c"], ["xc"]),
         helper.make_node("ReduceSum", ["xc", "axis"], [x_parity], keepdims=0)],
        "enc_0", [x_grp], [helper.make_tensor_value_info(x_parity, TensorProto.FLOAT, [BATCH_DIM, *shape])],
        {"c": coeffs.reshape(1, k, 1, 1, 1), "axis": np.array([1], dtype=np.int64)},
    )
    parm = _graph(  # sum_j head(f(x_j)) = (sum_j x_j) W_f W_h + k b
        [helper.make_node("ReduceSum", [x_name, "axis"], ["xs"], keepdims=0),
         helper.make_node("Reshape", ["xs", "flat"], ["xsf"]),
         helper.make_node("Gemm", ["xsf", "w", "b"], [logits_sum])],
        "parm", [x_grp], [helper.make_tensor_value_info(logits_sum, TensorProto.FLOAT, [BATCH_DIM, num_classes])],
        {"axis": np.array([1], dtype=np.int64), "flat": flat, "w": (w_f @ w_h).astype(np.float32),
         "b": (k * b_h).astype(np.float32)},
    )
    files = {F_FILE: f, head_file(TASK): head, code_encoder_file(k + 1, k, 0): enc, code_parm_file(k + 1, k): parm}
    for rel, model in files.items():
        _save(model, out / rel)
    manifest = Manifest.from_dict(_manifest_data(
        k, shape, list(shape), [0.1307] * shape[0], [0.3081] * shape[0],
        [{"task": TASK, "file": head_file(TASK), "classes": [str(i) for i in range(num_classes)]}],
        {"commands": [f"python -m bench.devbundle --out {out} --k {k} --seed {seed}"],
         "note": "linear throwaway bundle for benchmark development; not a trained model"},
        {rel: sha256_file(out / rel) for rel in files},
    ))
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
                              dynamic_shapes=({0: torch.export.Dim(BATCH_DIM)},), opset_version=OPSET,
                              dynamo=True, external_data=False)
        return path
    return export_onnx(module, sample_shape, path, input_name=input_name, output_name=output_name)


# The encoder of `python -m trainer encoder --preset cpu` (the shipped bundle's budget).
CPU_PRESET_ENCODER = {"base_channels": 16, "depth": 2, "shared_levels": 1}


def build_iresnet_bundle(out_dir: str | Path, k: int, seed: int = 0,
                         encoder: dict[str, int | str] | None = None) -> Path:
    """Untrained real-architecture (n=k+1, c=1/k) MNIST bundle: timing-faithful, answers meaningless."""
    import torch

    from runtime.manifest import Manifest, sha256_file
    from trainer.data import get_spec
    from trainer.models import Classifier, ClassifierConfig, default_heads
    from trainer.models.encoder import EncoderConfig, make_encoder
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
    files = {F_FILE: export_module(f, shape, out / F_FILE, *F_IO)}
    heads = []
    for h in cfg.heads:
        rel = head_file(h.task)
        files[rel] = export_module(model.heads[h.task], emb, out / rel, *HEAD_IO)
        heads.append({"task": h.task, "file": rel, "classes": list(h.class_names)})
    enc_cfg = EncoderConfig(in_channels=shape[0], image_size=list(shape[1:]), k=k, coefficients=[[1.0 / k] * k],
                            **(CPU_PRESET_ENCODER if encoder is None else encoder))
    enc_rel, parm_rel = code_encoder_file(k + 1, k, 0), code_parm_file(k + 1, k)
    files[enc_rel] = export_module(make_encoder(enc_cfg, 0), (k, *shape), out / enc_rel, *ENCODER_IO)
    parm = ParityModel(ParMConfig(k=k, classifier=cfg.to_dict()), Classifier(cfg)).eval()
    parm.f = parm.f.folded()
    files[parm_rel] = export_module(parm, (k, *shape), out / parm_rel, *PARM_IO)
    manifest = Manifest.from_dict(_manifest_data(
        k, shape, list(emb), list(spec.mean), list(spec.std), heads,
        {"commands": [f"python -m bench.devbundle --arch iresnet --out {out} --k {k} --seed {seed}"],
         "note": "UNTRAINED real-architecture bundle (random init) for timing only",
         "f_config": f_cfg.to_dict(), "encoder_config": enc_cfg.to_dict()},
        {rel: sha256_file(out / rel) for rel in files},
    ))
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
