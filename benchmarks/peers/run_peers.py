"""Peer engines for the per-example-gradient Gram benchmark (PyTorch, BackPACK, JAX).

Run in the peers' own environment (see README.md / setup.sh):

    .venv-peers/bin/python benchmarks/peers/run_peers.py SPEC.npz \
        --engines torch_func,backpack,jax --repeats 5 --out RESULT.json

SPEC.npz is described in make_spec.py. For each engine, in its own fresh child
process, the runner rebuilds the Keras network from the spec's weights,
computes the per-example gradients g_i of l_i = -log p_i[y_i] (not divided by
the batch size) for every trainable parameter and the Gram matrix
G = J J^T (float32), times it (warm-up runs, then the median of --repeats),
and reports the eigenvalues of G (float64 eigvalsh, descending, untimed) and
the child's peak RSS above its RSS after loading the model and the data. A
second child per framework times the plain training step (forward and
backward of the mean loss, SGD update).

Output JSON:

    {engine: {"seconds": float | null,        # median, per-example grads + Gram
              "step_seconds": float | null,   # median, plain training step
              "peak_mb": float | null,        # measurement child, MB above baseline
              "step_peak_mb": float | null,   # training-step child, MB above baseline
              "eigenvalues": [float, ...] | null,  # of G, descending
              "comparable": bool,             # eigenvalues comparable to keras-fim's
              "note": str | null,             # e.g. the BatchNorm caveat
              "error": str | null,            # set when the engine failed
              "step_error": str | null,
              "seconds_all": [float], "step_seconds_all": [float],  # every repeat
              # only when the spec holds reference_eigenvalues and comparable:
              "max_rel_err_top5": float, "max_err_rel_to_top": float},
     "_meta": {...}}                          # run description, not an engine
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np

# benchmarks/rss.py: peak RSS from /proc (plain Python, shared with the TF side).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rss

ENGINES = ("torch_func", "backpack", "jax")
FRAMEWORK = {"torch_func": "torch", "backpack": "torch", "jax": "jax"}
BN_NOTE = "not comparable (BN in inference mode)"


# --------------------------------------------------------------------------- spec


def load_spec(path):
    with np.load(path, allow_pickle=False) as f:
        data = {k: f[k] for k in f.files}
    spec = {
        "arch": str(data["arch"]),
        "x": data["x"].astype("float32"),
        "y": data["y"].astype("int64"),
        "w": [data[f"w{i}"].astype("float32") for i in range(int(data["n_trainable"]))],
        "nt": [
            data[f"nt{i}"].astype("float32")
            for i in range(int(data.get("n_non_trainable", 0)))
        ],
        "bn_epsilon": float(data.get("bn_epsilon", 1e-3)),
        "blocks_per_stage": int(data.get("blocks_per_stage", 1)),
        "widths": [int(v) for v in data.get("widths", [16, 32, 64])],
        "reference": data.get("reference_eigenvalues"),
    }
    if spec["arch"] not in ("mlp", "resnet", "resnet_bn"):
        raise ValueError(f"unknown arch {spec['arch']!r}")
    return spec


def expected_shapes(spec):
    """Trainable / non-trainable shapes in Keras order, Keras layouts."""
    w, nt = [], []
    if spec["arch"] == "mlp":
        sizes = [int(np.prod(spec["x"].shape[1:])), 512, 512, 10]
        for a, b in itertools.pairwise(sizes):
            w += [(a, b), (b,)]
        return w, nt
    bn = spec["arch"] == "resnet_bn"
    cin = spec["x"].shape[-1]

    def conv(ci, co):
        w.append((3, 3, ci, co))
        if bn:
            w.extend([(co,), (co,)])
            nt.extend([(co,), (co,)])
        else:
            w.append((co,))

    widths = spec["widths"]
    conv(cin, widths[0])
    c = widths[0]
    for f in widths:
        for _ in range(spec["blocks_per_stage"]):
            conv(c, f)
            conv(f, f)
            c = f
    w += [(c, 10), (10,)]
    return w, nt


def check_spec(spec):
    w, nt = expected_shapes(spec)
    got_w = [tuple(a.shape) for a in spec["w"]]
    got_nt = [tuple(a.shape) for a in spec["nt"]]
    if got_w != w or got_nt != nt:
        raise ValueError(
            f"spec weights do not match arch {spec['arch']}: trainable {got_w} vs "
            f"expected {w}; non-trainable {got_nt} vs expected {nt}"
        )


def tf_same_pad(size, k, s):
    """TensorFlow "SAME" padding (before, after) along one axis."""
    out = -(-size // s)
    total = max((out - 1) * s + k - size, 0)
    return total // 2, total - total // 2


# ------------------------------------------------------------------------ memory


# ------------------------------------------------------------------------- torch


def torch_model(spec, torch):
    nn = torch.nn
    F = torch.nn.functional
    arch = spec["arch"]
    eps = spec["bn_epsilon"]

    if arch == "mlp":
        model = nn.Sequential(
            nn.Flatten(),
            nn.Linear(spec["w"][0].shape[0], 512),
            nn.ReLU(),
            nn.Linear(512, 512),
            nn.ReLU(),
            nn.Linear(512, 10),
        )
        linears = [m for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for i, lin in enumerate(linears):
                lin.weight.copy_(torch.from_numpy(spec["w"][2 * i].T.copy()))
                lin.bias.copy_(torch.from_numpy(spec["w"][2 * i + 1]))
        return model

    bn = arch == "resnet_bn"
    weights = iter(spec["w"])
    stats = iter(spec["nt"])

    class ConvUnit(nn.Module):
        """[asymmetric zero pad] -> conv -> [BN], with TF "SAME" padding."""

        def __init__(self, cin, cout, stride, size):
            super().__init__()
            before, after = tf_same_pad(size, 3, stride)
            if before == after:
                self.pad = None
                padding = before
            else:
                self.pad = nn.ZeroPad2d((before, after, before, after))
                padding = 0
            self.conv = nn.Conv2d(cin, cout, 3, stride, padding, bias=not bn)
            self.bn = nn.BatchNorm2d(cout, eps=eps, momentum=0.01) if bn else None
            with torch.no_grad():
                k = next(weights)
                self.conv.weight.copy_(torch.from_numpy(k.transpose(3, 2, 0, 1).copy()))
                if bn:
                    self.bn.weight.copy_(torch.from_numpy(next(weights)))
                    self.bn.bias.copy_(torch.from_numpy(next(weights)))
                    self.bn.running_mean.copy_(torch.from_numpy(next(stats)))
                    self.bn.running_var.copy_(torch.from_numpy(next(stats)))
                else:
                    self.conv.bias.copy_(torch.from_numpy(next(weights)))

        def forward(self, x):
            if self.pad is not None:
                x = self.pad(x)
            x = self.conv(x)
            return self.bn(x) if self.bn is not None else x

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, size):
            super().__init__()
            self.unit1 = ConvUnit(cin, cout, stride, size)
            self.relu1 = nn.ReLU()
            self.unit2 = ConvUnit(cout, cout, 1, -(-size // stride))
            self.relu2 = nn.ReLU()
            self.stride = stride
            self.missing = cout - cin
            self.project = stride != 1 or cin != cout

        def forward(self, x):
            h = self.unit2(self.relu1(self.unit1(x)))
            s = x
            if self.project:  # keras-fim ZeroPadShortcut: subsample, zero channels
                s = s[:, :, :: self.stride, :: self.stride]
                s = F.pad(s, (0, 0, 0, 0, 0, self.missing))
            return self.relu2(h + s)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            size = spec["x"].shape[1]
            widths = spec["widths"]
            self.stem = ConvUnit(spec["x"].shape[-1], widths[0], 1, size)
            self.relu = nn.ReLU()
            blocks, c = [], widths[0]
            for stage, f in enumerate(widths):
                for b in range(spec["blocks_per_stage"]):
                    stride = 2 if stage > 0 and b == 0 else 1
                    blocks.append(Block(c, f, stride, size))
                    size, c = -(-size // stride), f
            self.blocks = nn.Sequential(*blocks)
            self.fc = nn.Linear(c, 10)
            with torch.no_grad():
                self.fc.weight.copy_(torch.from_numpy(next(weights).T.copy()))
                self.fc.bias.copy_(torch.from_numpy(next(weights)))

        def forward(self, x):
            x = self.blocks(self.relu(self.stem(x)))
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet()


def torch_inputs(spec, torch):
    x = torch.from_numpy(spec["x"])
    if spec["arch"] == "mlp":
        x = x.reshape(x.shape[0], -1)
    else:
        x = x.permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
    return x, torch.from_numpy(spec["y"])


def torch_setup(spec, threads):
    import torch

    torch.set_num_threads(threads)
    model = torch_model(spec, torch)
    x, y = torch_inputs(spec, torch)
    return torch, model, x, y


def torch_gram(torch, grads, batch):
    gram = None
    for g in grads:
        flat = g.reshape(batch, -1)
        block = flat @ flat.T
        gram = block if gram is None else gram + block
    return gram


def make_torch_func(spec, threads):
    torch, model, x, y = torch_setup(spec, threads)
    from torch.func import functional_call, grad, vmap

    F = torch.nn.functional
    model.eval()  # the only BN mode whose per-example gradients are defined
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def loss_one(p, xi, yi):
        out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return F.cross_entropy(out, yi.unsqueeze(0), reduction="sum")

    per_example = vmap(grad(loss_one), in_dims=(None, 0, 0))
    batch = x.shape[0]

    def run():
        g = per_example(params, x, y)
        return torch_gram(torch, g.values(), batch)

    return run, lambda g: g.numpy()


def make_backpack(spec, threads):
    torch, model, x, y = torch_setup(spec, threads)
    from backpack import backpack, extend
    from backpack.extensions import BatchGrad

    model.eval()  # BackPACK refuses BatchNorm in training mode
    model = extend(model)
    # reduction="sum": grad_batch[i] is then the gradient of l_i itself.
    lossfn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    params = [p for p in model.parameters() if p.requires_grad]
    batch = x.shape[0]

    def run():
        model.zero_grad(set_to_none=True)
        loss = lossfn(model(x), y)
        with backpack(BatchGrad()):
            loss.backward()
        with torch.no_grad():
            gram = torch_gram(torch, [p.grad_batch for p in params], batch)
        for p in params:
            p.grad_batch = None
        return gram

    return run, lambda g: g.numpy()


def make_torch_step(spec, threads, lr=0.01):
    torch, model, x, y = torch_setup(spec, threads)
    F = torch.nn.functional
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr)

    def run():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    return run, lambda v: v


# --------------------------------------------------------------------------- jax


def jax_setup(spec):
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    params = [jnp.asarray(w) for w in spec["w"]]
    stats = [jnp.asarray(s) for s in spec["nt"]]
    x = jnp.asarray(spec["x"])
    if spec["arch"] == "mlp":
        x = x.reshape(x.shape[0], -1)
    y = jnp.asarray(spec["y"].astype("int32"))
    return jax, jnp, params, stats, x, y


def jax_forward(spec, jax, jnp):
    """forward(params, stats, x, train) -> (logits, new_stats); Keras layouts, NHWC."""
    arch = spec["arch"]
    eps = spec["bn_epsilon"]
    lax = jax.lax

    if arch == "mlp":

        def forward(params, stats, x, train=False):
            h = x
            for i in range(3):
                h = h @ params[2 * i] + params[2 * i + 1]
                if i < 2:
                    h = jax.nn.relu(h)
            return h, stats

        return forward

    bn = arch == "resnet_bn"

    def forward(params, stats, x, train=False):
        pi, si = iter(range(len(params))), iter(range(len(stats)))
        new_stats = list(stats)

        def unit(h, stride):
            h = lax.conv_general_dilated(
                h,
                params[next(pi)],
                (stride, stride),
                "SAME",
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            if not bn:
                return h + params[next(pi)]
            gamma, beta = params[next(pi)], params[next(pi)]
            im, iv = next(si), next(si)
            if train:  # batch statistics, Keras moving-average update (0.99)
                mean = h.mean(axis=(0, 1, 2))
                var = h.var(axis=(0, 1, 2))
                new_stats[im] = 0.99 * stats[im] + 0.01 * lax.stop_gradient(mean)
                new_stats[iv] = 0.99 * stats[iv] + 0.01 * lax.stop_gradient(var)
            else:
                mean, var = stats[im], stats[iv]
            return (h - mean) * lax.rsqrt(var + eps) * gamma + beta

        h = jax.nn.relu(unit(x, 1))
        c = h.shape[-1]
        for stage, f in enumerate(spec["widths"]):
            for b in range(spec["blocks_per_stage"]):
                stride = 2 if stage > 0 and b == 0 else 1
                r = unit(jax.nn.relu(unit(h, stride)), 1)
                s = h
                if stride != 1 or c != f:
                    s = s[:, ::stride, ::stride, :]
                    s = jnp.pad(s, ((0, 0), (0, 0), (0, 0), (0, f - c)))
                h, c = jax.nn.relu(r + s), f
        h = h.mean(axis=(1, 2))
        return h @ params[next(pi)] + params[next(pi)], new_stats

    return forward


def make_jax(spec, threads):
    jax, jnp, params, stats, x, y = jax_setup(spec)
    forward = jax_forward(spec, jax, jnp)

    def loss_one(p, xi, yi):
        logits, _ = forward(p, stats, xi[None], False)  # BN: inference mode
        return -jax.nn.log_softmax(logits)[0, yi]

    @jax.jit
    def gram(p, x, y):
        g = jax.vmap(jax.grad(loss_one), in_axes=(None, 0, 0))(p, x, y)
        batch = x.shape[0]
        out = None
        for gi in g:
            flat = gi.reshape(batch, -1)
            block = flat @ flat.T
            out = block if out is None else out + block
        return out

    def run():
        return gram(params, x, y).block_until_ready()

    return run, lambda g: np.asarray(g)


def make_jax_step(spec, threads, lr=0.01):
    jax, jnp, params, stats, x, y = jax_setup(spec)
    forward = jax_forward(spec, jax, jnp)

    def mean_loss(p, s, x, y):
        logits, new_s = forward(p, s, x, True)
        logp = jax.nn.log_softmax(logits)
        return -jnp.take_along_axis(logp, y[:, None], axis=1).mean(), new_s

    @jax.jit
    def step(p, s, x, y):
        (loss, new_s), g = jax.value_and_grad(mean_loss, has_aux=True)(p, s, x, y)
        return [pi - lr * gi for pi, gi in zip(p, g, strict=True)], new_s, loss

    state = {"p": params, "s": stats}

    def run():
        state["p"], state["s"], loss = step(state["p"], state["s"], x, y)
        return loss.block_until_ready()

    return run, lambda v: v


# ------------------------------------------------------------------------- child

MAKERS = {
    ("torch_func", "measure"): make_torch_func,
    ("backpack", "measure"): make_backpack,
    ("jax", "measure"): make_jax,
    ("torch", "step"): make_torch_step,
    ("jax", "step"): make_jax_step,
}


def child_main(a):
    result = {"seconds": None, "peak_mb": None, "eigenvalues": None, "error": None}
    try:
        spec = load_spec(a.spec)
        check_spec(spec)
        make = MAKERS[(a.child, a.task)]
        # Baseline: the framework imported, the model and the data loaded.
        run, to_numpy = make(spec, a.threads)
        baseline = rss.reset_peak()
        for _ in range(a.warmup):
            out = run()
        times = []
        for _ in range(a.repeats):
            t0 = time.perf_counter()
            out = run()
            times.append(time.perf_counter() - t0)
        result["peak_mb"] = rss.peak_above(baseline) / 2**20
        result["seconds"] = statistics.median(times)
        result["all_seconds"] = times
        result["baseline_mb"] = baseline / 2**20
        if a.task == "measure":
            gram = np.asarray(to_numpy(out), dtype="float64")
            gram = 0.5 * (gram + gram.T)
            result["eigenvalues"] = np.linalg.eigvalsh(gram)[::-1].tolist()
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()
    with open(a.result, "w") as f:
        json.dump(result, f)


def run_child(a, who, task):
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tmp:
        path = tmp.name
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        a.spec,
        "--child",
        who,
        "--task",
        task,
        "--repeats",
        str(a.repeats),
        "--warmup",
        str(a.warmup),
        "--threads",
        str(a.threads),
        "--result",
        path,
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=a.timeout, check=False
        )
        try:
            with open(path) as f:
                res = json.load(f)
        except (OSError, ValueError):
            res = {"error": None}
        if proc.returncode != 0 and not res.get("error"):
            tail = (proc.stderr or "").strip().splitlines()[-5:]
            res["error"] = f"child exited with {proc.returncode}: " + " | ".join(tail)
    except subprocess.TimeoutExpired:
        res = {"error": f"timed out after {a.timeout} s"}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    if res.get("error") and a.verbose:
        print(res.get("traceback", res["error"]), file=sys.stderr)
    return res


def agreement(eig, ref, k=5):
    eig, ref = np.asarray(eig), np.asarray(ref, dtype="float64")
    k = min(k, len(ref), len(eig))
    top = np.abs(eig[:k] - ref[:k]) / np.maximum(np.abs(ref[:k]), 1e-300)
    n = min(len(ref), len(eig))
    whole = np.abs(eig[:n] - ref[:n]).max() / abs(ref[0])
    return float(top.max()), float(whole)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec")
    p.add_argument("--engines", default=",".join(ENGINES))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=float, default=1800.0, help="per child, s")
    p.add_argument("--no-step", action="store_true", help="skip the plain steps")
    p.add_argument("--out")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--task", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        return child_main(a)

    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    unknown = [e for e in engines if e not in ENGINES]
    if unknown:
        p.error(f"unknown engines {unknown}; choose from {ENGINES}")
    spec = load_spec(a.spec)
    bn = spec["arch"] == "resnet_bn"
    results, steps = {}, {}
    for engine in engines:
        res = run_child(a, engine, "measure")
        fw = FRAMEWORK[engine]
        if not a.no_step and fw not in steps:
            steps[fw] = run_child(a, fw, "step")
        step = steps.get(fw, {})
        entry = {
            "seconds": res.get("seconds"),
            "step_seconds": step.get("seconds"),
            "peak_mb": res.get("peak_mb"),
            "step_peak_mb": step.get("peak_mb"),
            "eigenvalues": res.get("eigenvalues"),
            "comparable": (not bn) and not res.get("error"),
            "note": BN_NOTE if bn else None,
            "error": res.get("error"),
            "step_error": step.get("error"),
            "seconds_all": res.get("all_seconds"),
            "step_seconds_all": step.get("all_seconds"),
        }
        if spec["reference"] is not None and entry["comparable"]:
            top, whole = agreement(entry["eigenvalues"], spec["reference"])
            entry["max_rel_err_top5"], entry["max_err_rel_to_top"] = top, whole
        results[engine] = entry
        if a.verbose:
            print(
                f"{engine}: {entry['seconds']} s (step {entry['step_seconds']} s), "
                f"peak {entry['peak_mb']} MB, error {entry['error']}",
                file=sys.stderr,
            )
    results["_meta"] = meta(a, spec)
    text = json.dumps(results, indent=1)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)
    else:
        print(text)


def meta(a, spec):
    versions = {}
    for name, module in (("torch", "torch"), ("backpack", "backpack"), ("jax", "jax")):
        try:
            from importlib.metadata import version

            versions[name] = version(
                {"backpack": "backpack-for-pytorch"}.get(name, module)
            )
        except Exception:
            versions[name] = None
    return {
        "arch": spec["arch"],
        "batch": int(spec["x"].shape[0]),
        "n_params": int(sum(w.size for w in spec["w"])),
        "repeats": a.repeats,
        "warmup": a.warmup,
        "threads": a.threads,
        "versions": versions,
        "seconds": "median wall clock of per-example gradients + float32 Gram "
        "(JAX: jitted, after compile); eigensolve excluded",
        "step_seconds": "median wall clock of forward + backward of the mean loss "
        "+ SGD update (BN in training mode)",
        "peak_mb": "child peak RSS (reset after loading) minus its RSS after "
        "loading the model and data, MB",
    }


if __name__ == "__main__":
    main()
