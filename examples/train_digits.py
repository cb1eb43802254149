"""Train a small NumPy CNN on scikit-learn's handwritten digits, with and without cybn.

The network is written in plain NumPy (im2col convolutions, ReLU, max pooling,
a linear classifier, softmax cross-entropy, SGD with momentum and a cosine
learning-rate decay). The only things that change between runs are whether a
``cybn.BatchNorm2d`` layer follows each convolution, the learning rate, and
how the weights are initialised:

    conv3x3(1->16) -> [BN] -> ReLU -> maxpool2   8x8 -> 4x4
    conv3x3(16->32) -> [BN] -> ReLU -> maxpool2  4x4 -> 2x2
    flatten(128) -> linear(10) -> softmax cross-entropy

Six runs are compared side by side:

* a normal peak learning rate (0.05),
* a large peak learning rate (0.3),
* a badly scaled initialisation (convolution weights 10x larger than He
  initialisation), at the normal learning rate,

each without and with batch normalization. The script prints the test loss and
accuracy after every epoch, a summary table, checks that a BN model survives a
``state_dict`` round trip through an ``.npz`` file, and writes the curves of
every run to a PNG.

``--variants`` instead compares plain batch norm with the two variants of
docs/variants.md, in pairs that differ only in the variant:

* batch renormalization (``renorm=True``, rmax and dmax raised from 1 and 0
  during training, as in Ioffe 2017) at batch size 4,
* batch renormalization with non-i.i.d. batches of 16, each drawn from only
  two classes,
* ghost batches of 32 (``ghost_batch_size=32``) at batch size 512.

Usage::

    python examples/train_digits.py                 # default: 15 epochs
    python examples/train_digits.py --quick         # 3 epochs, for a smoke test
    python examples/train_digits.py --epochs 30 --seed 1 --out curves.png
    python examples/train_digits.py --variants      # the variants, 15 epochs

Needs: numpy, cybn, scikit-learn, matplotlib, tqdm.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

import cybn

DTYPE = np.float32


# --------------------------------------------------------------------------
# Layers as pairs of functions: ``*_forward`` returns the output and a cache
# of what the backward pass needs; ``*_backward`` takes the upstream gradient
# and that cache. They are dtype-generic so the tests can check them in
# float64 with finite differences.
# --------------------------------------------------------------------------


def im2col(x, k, pad):
    """(N, C, H, W) -> (N*H*W, C*k*k) patches for a stride-1 'same' conv.

    Each row is one output pixel's receptive field, so the convolution becomes
    a single matrix product, which is what BLAS is fast at.
    """
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    # A read-only view of shape (N, C, H, W, k, k); no copy until the reshape.
    win = np.lib.stride_tricks.sliding_window_view(xp, (k, k), axis=(2, 3))
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * k * k)


def col2im(dcols, x_shape, k, pad):
    """Adjoint of :func:`im2col`: scatter-add patch gradients back to pixels."""
    n, c, h, w = x_shape
    d = dcols.reshape(n, h, w, c, k, k)
    dxp = np.zeros((n, c, h + 2 * pad, w + 2 * pad), dtype=dcols.dtype)
    # k*k shifted adds instead of a loop over pixels: each kernel offset
    # (i, j) touches every output pixel once.
    for i in range(k):
        for j in range(k):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, pad:pad + h, pad:pad + w]


def conv_forward(x, w, b=None):
    """Stride-1 'same' convolution. x: (N, C, H, W), w: (F, C, k, k), b: (F,) or None."""
    n, _, h, wd = x.shape
    f, _, k, _ = w.shape
    pad = k // 2
    cols = im2col(x, k, pad)
    out = cols @ w.reshape(f, -1).T                      # (N*H*W, F)
    if b is not None:
        out += b
    # Back to NCHW. Made C-contiguous here because cybn's kernels work on
    # contiguous memory and would otherwise make the copy themselves.
    out = np.ascontiguousarray(out.reshape(n, h, wd, f).transpose(0, 3, 1, 2))
    return out, (x.shape, cols, w)


def conv_backward(dout, cache):
    """Returns (dx, dw, db) for :func:`conv_forward`."""
    x_shape, cols, w = cache
    f, _, k, _ = w.shape
    d2 = dout.transpose(0, 2, 3, 1).reshape(-1, f)       # (N*H*W, F)
    dw = (d2.T @ cols).reshape(w.shape)
    db = d2.sum(axis=0)
    dx = col2im(d2 @ w.reshape(f, -1), x_shape, k, k // 2)
    return dx, dw, db


def relu_forward(x):
    return np.maximum(x, 0), x > 0


def relu_backward(dout, mask):
    return dout * mask


def maxpool_forward(x):
    """2x2 max pooling with stride 2 (H and W must be even)."""
    n, c, h, w = x.shape
    # Gather each 2x2 window into a trailing axis of length 4.
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5)
    win = win.reshape(n, c, h // 2, w // 2, 4)
    idx = win.argmax(axis=-1)
    out = np.take_along_axis(win, idx[..., None], axis=-1)[..., 0]
    return out, (x.shape, idx)


def maxpool_backward(dout, cache):
    # Route each gradient to the single element that won the max (argmax, so
    # ties -- common after ReLU -- send the gradient to one element only).
    x_shape, idx = cache
    n, c, h, w = x_shape
    dwin = np.zeros(idx.shape + (4,), dtype=dout.dtype)
    np.put_along_axis(dwin, idx[..., None], dout[..., None], axis=-1)
    dwin = dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5)
    return dwin.reshape(x_shape)


def linear_forward(x, w, b):
    """x: (N, D), w: (D, K), b: (K,)."""
    return x @ w + b, x


def linear_backward(dout, x, w):
    return dout @ w.T, x.T @ dout, dout.sum(axis=0)


def softmax_xent(logits, y):
    """Mean softmax cross-entropy and its gradient with respect to the logits."""
    # Subtracting the row max keeps exp() from overflowing (log-sum-exp trick).
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = len(y)
    loss = -logp[np.arange(n), y].mean()
    dlogits = np.exp(logp)
    dlogits[np.arange(n), y] -= 1
    return float(loss), dlogits / n


# --------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------


class DigitsNet:
    """conv-[BN]-relu-pool x2, then a linear classifier. Parameters in ``self.params``."""

    CHANNELS = (1, 16, 32)
    NUM_CLASSES = 10

    def __init__(self, use_bn, rng, init_scale=1.0, dtype=DTYPE, bn_options=None):
        self.use_bn = use_bn
        self.params = {}
        self.bns = []
        for i in range(2):
            cin, cout = self.CHANNELS[i], self.CHANNELS[i + 1]
            # He initialisation: keeps the activation variance roughly constant
            # through ReLU layers. ``init_scale`` lets us deliberately break it.
            std = init_scale * np.sqrt(2.0 / (cin * 9))
            self.params[f"conv{i + 1}.w"] = (rng.standard_normal((cout, cin, 3, 3)) * std).astype(dtype)
            if use_bn:
                # BN subtracts the per-channel mean, so a conv bias would be
                # cancelled out; BN's own ``bias`` plays that role instead.
                self.bns.append(cybn.BatchNorm2d(cout, dtype=dtype, **(bn_options or {})))
            else:
                self.params[f"conv{i + 1}.b"] = np.zeros(cout, dtype=dtype)
        d = self.CHANNELS[-1] * 2 * 2
        self.params["fc.w"] = (rng.standard_normal((d, self.NUM_CLASSES)) * np.sqrt(1.0 / d)).astype(dtype)
        self.params["fc.b"] = np.zeros(self.NUM_CLASSES, dtype=dtype)

    # BN layers switch between batch statistics (training) and running
    # statistics (evaluation); the rest of the network has no such mode.
    def train(self):
        for bn in self.bns:
            bn.train()

    def eval(self):
        for bn in self.bns:
            bn.eval()

    def forward(self, x):
        p = self.params
        self._caches = []
        h = x
        for i in range(2):
            h, conv_c = conv_forward(h, p[f"conv{i + 1}.w"], p.get(f"conv{i + 1}.b"))
            if self.use_bn:
                h = self.bns[i](h)
            h, relu_c = relu_forward(h)
            h, pool_c = maxpool_forward(h)
            self._caches.append((conv_c, relu_c, pool_c))
        self._pooled_shape = h.shape
        flat = h.reshape(len(h), -1)
        logits, self._fc_cache = linear_forward(flat, p["fc.w"], p["fc.b"])
        return logits

    def backward(self, dlogits):
        """Backpropagate from d(loss)/d(logits); returns a dict of gradients.

        BN gradients are not in the dict: ``bn.backward`` leaves them on the
        layer as ``grad_weight`` / ``grad_bias``, and :class:`SGD` reads them there.
        """
        p = self.params
        grads = {}
        dflat, grads["fc.w"], grads["fc.b"] = linear_backward(dlogits, self._fc_cache, p["fc.w"])
        dh = dflat.reshape(self._pooled_shape)
        for i in reversed(range(2)):
            conv_c, relu_c, pool_c = self._caches[i]
            dh = maxpool_backward(dh, pool_c)
            dh = relu_backward(dh, relu_c)
            if self.use_bn:
                dh = self.bns[i].backward(dh)
            dh, dw, db = conv_backward(dh, conv_c)
            grads[f"conv{i + 1}.w"] = dw
            if not self.use_bn:
                grads[f"conv{i + 1}.b"] = db
        return grads

    # Saving: NumPy params plus each BN layer's state_dict, flattened into one
    # namespace so that a single ``np.savez`` holds the whole model.
    def state_dict(self):
        state = {k: v.copy() for k, v in self.params.items()}
        for i, bn in enumerate(self.bns):
            for k, v in bn.state_dict().items():
                state[f"bn{i + 1}.{k}"] = v
        return state

    def load_state_dict(self, state):
        for k in self.params:
            self.params[k][...] = state[k]
        for i, bn in enumerate(self.bns):
            prefix = f"bn{i + 1}."
            bn.load_state_dict({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})


def cosine_lr(peak, step, total_steps):
    """Learning rate at ``step``: a half cosine from ``peak`` down to 0.

    With a constant rate the runs at a high rate end wherever their last noisy
    step left them; decaying it lets every run settle, so the final numbers
    compare the configurations rather than the luck of the last batch.
    """
    return peak * 0.5 * (1.0 + np.cos(np.pi * step / total_steps))


class SGD:
    """SGD with (heavy-ball) momentum for the NumPy params and the BN layers.

    ``lr`` is a plain attribute so the training loop can schedule it.
    """

    def __init__(self, model, lr, momentum=0.9):
        self.model, self.lr, self.momentum = model, lr, momentum
        self.velocity = {k: np.zeros_like(v) for k, v in model.params.items()}
        for i, bn in enumerate(model.bns, start=1):
            self.velocity[f"bn{i}.weight"] = np.zeros_like(bn.weight)
            self.velocity[f"bn{i}.bias"] = np.zeros_like(bn.bias)

    def _update(self, key, param, grad):
        v = self.velocity[key]
        v *= self.momentum
        v += grad
        param -= self.lr * v            # in place: the model keeps the same array

    def step(self, grads):
        for k, g in grads.items():
            self._update(k, self.model.params[k], g)
        for i, bn in enumerate(self.model.bns, start=1):
            # bn.weight / bn.bias are the layer's own parameter arrays; updating
            # them in place is how a training loop changes a cybn layer.
            self._update(f"bn{i}.weight", bn.weight, bn.grad_weight)
            self._update(f"bn{i}.bias", bn.bias, bn.grad_bias)


# --------------------------------------------------------------------------
# Data, training and evaluation
# --------------------------------------------------------------------------


def load_data(seed, test_size=0.2):
    """sklearn's 8x8 digits (bundled with the package, no download), as float32 NCHW."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.images / 16.0).astype(DTYPE)[:, None, :, :]      # pixel values are 0..16
    y = digits.target.astype(np.int64)
    return train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)


def evaluate(model, x, y, batch_size=512):
    """Test loss and accuracy, with BN in eval mode (running statistics)."""
    model.eval()
    losses, correct = [], 0
    with np.errstate(over="ignore", invalid="ignore"):
        for s in range(0, len(x), batch_size):
            logits = model.forward(x[s:s + batch_size])
            loss, _ = softmax_xent(logits, y[s:s + batch_size])
            losses.append(loss * len(logits))
            correct += int((logits.argmax(axis=1) == y[s:s + batch_size]).sum())
    model.train()
    return sum(losses) / len(x), correct / len(x)


def batch_indices(rng, labels, batch_size, kind="iid"):
    """One epoch's batches, as arrays of indices.

    "iid": a random permutation cut into batches (the last one may be
    smaller).  "iid-full": the same without the partial last batch (ghost
    batches need N to be a multiple of their size).  "two-class": non-i.i.d.
    batches, each drawn from only two classes: the classes are paired at
    random, each pair's samples shuffled and cut into full batches, and the
    batches of all pairs shuffled together.
    """
    if kind in ("iid", "iid-full"):
        order = rng.permutation(len(labels))
        end = len(order) - len(order) % batch_size if kind == "iid-full" else len(order)
        return [order[s:s + batch_size] for s in range(0, end, batch_size)]
    if kind != "two-class":
        raise ValueError(f"unknown batch kind {kind!r}")
    classes = rng.permutation(np.unique(labels))
    batches = []
    for a, b in zip(classes[0::2], classes[1::2]):
        pool = rng.permutation(np.flatnonzero((labels == a) | (labels == b)))
        batches += [pool[s:s + batch_size] for s in range(0, len(pool) - batch_size + 1,
                                                           batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def renorm_limits(step, total_steps):
    """rmax and dmax at ``step``: 1 and 0 for the first 5% of the steps, then
    raised linearly to 3 and 5 by 50% of the steps.  Ioffe (2017) keeps them at
    1 and 0 for 5k steps and reaches 3 and 5 after 40k and 25k of 160k steps;
    this is that schedule fitted to a short run."""
    t = min(max((step / total_steps - 0.05) / 0.45, 0.0), 1.0)
    return 1.0 + 2.0 * t, 5.0 * t


def train_run(cfg, data, epochs, seed, batch_size, progress=True):
    """Train one configuration; returns its per-epoch history and the model.

    cfg: name, bn, lr, init_scale, and optionally bn_options (for
    cybn.BatchNorm2d: renorm, ghost_batch_size), batch_size (overrides the
    argument) and batches (see batch_indices)."""
    from tqdm import tqdm

    x_tr, x_te, y_tr, y_te = data
    batch_size = cfg.get("batch_size", batch_size)
    kind = cfg.get("batches", "iid")
    bn_options = cfg.get("bn_options") or {}
    # The same seed for every run: all runs start from the same random draw
    # (up to init_scale) and see the batches in the same order.
    rng = np.random.default_rng(seed)
    model = DigitsNet(cfg["bn"], rng, init_scale=cfg["init_scale"], bn_options=bn_options)
    opt = SGD(model, cfg["lr"])
    model.train()

    hist = {"train_loss": [], "test_loss": [], "test_acc": []}
    n_batches = len(batch_indices(np.random.default_rng(seed), y_tr, batch_size, kind))
    total_steps, step = epochs * n_batches, 0
    bar = tqdm(total=total_steps, desc=f"{cfg['name']:<18}", leave=True,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    diverged = False
    t0 = time.perf_counter()
    for epoch in range(1, epochs + 1):
        batch_losses = []
        for idx in batch_indices(rng, y_tr, batch_size, kind):
            if bn_options.get("renorm"):
                for bn in model.bns:  # the layers' attributes, changed between steps
                    bn.rmax, bn.dmax = renorm_limits(step, total_steps)
            with np.errstate(over="ignore", invalid="ignore"):
                logits = model.forward(x_tr[idx])
                loss, dlogits = softmax_xent(logits, y_tr[idx])
            if not np.isfinite(loss):
                # Once a weight is inf/NaN nothing can recover; stop early.
                diverged = True
                break
            opt.lr = cosine_lr(cfg["lr"], step, total_steps)
            opt.step(model.backward(dlogits))
            step += 1
            batch_losses.append(loss)
            bar.update(1)
        if diverged:
            pad = epochs - epoch + 1
            for key in hist:
                hist[key].extend([float("nan")] * pad)
            hist["test_acc"][-pad:] = [evaluate(model, x_te, y_te)[1]] * pad
            bar.set_postfix_str("diverged (loss is not finite)")
            bar.write(f"  {cfg['name']}: diverged at epoch {epoch}")
            break
        test_loss, test_acc = evaluate(model, x_te, y_te)
        hist["train_loss"].append(float(np.mean(batch_losses)))
        hist["test_loss"].append(test_loss)
        hist["test_acc"].append(test_acc)
        bar.set_postfix(test_loss=f"{test_loss:.3f}", test_acc=f"{test_acc:.1%}")
        bar.write(f"  {cfg['name']:<18} epoch {epoch:2d}  train loss {hist['train_loss'][-1]:8.4f}"
                  f"  test loss {test_loss:8.4f}  test acc {test_acc:6.1%}")
    bar.close()
    hist["seconds"] = time.perf_counter() - t0
    hist["diverged"] = diverged
    if bn_options.get("renorm"):
        hist["final_limits"] = (model.bns[0].rmax, model.bns[0].dmax)
    hist["final_acc"] = hist["test_acc"][-1]
    hist["final_loss"] = hist["test_loss"][-1]
    return hist, model


def check_state_dict_roundtrip(model, cfg, data, seed, path):
    """Save a trained model to .npz, load it into fresh layers, compare eval accuracy."""
    x_te, y_te = data[1], data[3]
    np.savez(path, **model.state_dict())
    # A fresh model (different random init, fresh BatchNorm2d layers with
    # default running stats) must behave exactly like the trained one once
    # the saved state is loaded.
    fresh = DigitsNet(cfg["bn"], np.random.default_rng(seed + 1), init_scale=cfg["init_scale"])
    with np.load(path) as saved:
        fresh.load_state_dict(dict(saved))
    _, acc_before = evaluate(model, x_te, y_te)
    _, acc_after = evaluate(fresh, x_te, y_te)
    model.eval()
    fresh.eval()
    max_diff = float(np.abs(model.forward(x_te) - fresh.forward(x_te)).max())
    model.train()
    return acc_before, acc_after, max_diff


RUNS = [
    # name,               BN,    lr,   init_scale
    ("plain lr=0.05", False, 0.05, 1.0),
    ("BN lr=0.05", True, 0.05, 1.0),
    ("plain lr=0.3", False, 0.3, 1.0),
    ("BN lr=0.3", True, 0.3, 1.0),
    ("plain bad init", False, 0.05, 10.0),
    ("BN bad init", True, 0.05, 10.0),
]


def epochs_to(hist, threshold):
    for i, acc in enumerate(hist["test_acc"]):
        if acc >= threshold:
            return i + 1
    return None


def print_table(results, epochs):
    print()
    print(f"Results after {epochs} epochs (test split):")
    header = f"| {'run':<16} | {'BN':<3} | {'lr':>5} | {'init':>7} | {'test loss':>9} | {'test acc':>8} | {'best acc':>8} | {'epochs to 90%':>13} | {'time':>6} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        cfg = r["config"]
        loss = "diverged" if r["diverged"] else f"{r['final_loss']:.4g}"
        e90 = epochs_to(r, 0.90)
        best = max(a for a in r["test_acc"] if a == a)
        print(f"| {name:<16} | {'yes' if cfg['bn'] else 'no':<3} | {cfg['lr']:>5g} | {cfg['init_scale']:>6g}x"
              f" | {loss:>9} | {r['final_acc']:>8.1%} | {best:>8.1%} | {e90 if e90 else '-':>13} | {r['seconds']:>5.1f}s |")


def plot(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"lr=0.05": "tab:blue", "lr=0.3": "tab:red", "bad init": "tab:green"}
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        ep = np.arange(1, len(r["test_acc"]) + 1)
        color = next(c for key, c in colors.items() if name.endswith(key))
        style = "-" if r["config"]["bn"] else "--"
        label = name + (" (diverged)" if r["diverged"] else "")
        ax_loss.plot(ep, r["test_loss"], style, color=color, label=label, marker="o", ms=3)
        ax_acc.plot(ep, np.asarray(r["test_acc"]) * 100, style, color=color, label=label, marker="o", ms=3)
    ax_loss.set_yscale("log")
    ax_loss.set_title("test loss (solid: with cybn.BatchNorm2d)")
    ax_acc.set_title("test accuracy")
    ax_acc.set_ylabel("%")
    ax_acc.set_ylim(0, 100)
    for ax in (ax_loss, ax_acc):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    ax_acc.legend(loc="center right", fontsize=8)
    fig.suptitle("NumPy CNN on sklearn digits: with vs. without batch normalization")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


# The variants (docs/variants.md), each pair differing only in the variant.
VARIANT_RUNS = [
    # name,                    batch size, batches,     BatchNorm2d options,        lr
    ("BN, batch 4", 4, "iid-full", {}, 0.01),
    ("renorm, batch 4", 4, "iid-full", {"renorm": True}, 0.01),
    ("BN, 2-class batches", 16, "two-class", {}, 0.05),
    ("renorm, 2-class batches", 16, "two-class", {"renorm": True}, 0.05),
    ("BN, batch 512", 512, "iid-full", {}, 0.4),
    ("ghost 32, batch 512", 512, "iid-full", {"ghost_batch_size": 32}, 0.4),
]
# Batch 512 takes 2 steps per epoch: its runs get this many times the epochs.
LARGE_BATCH_EPOCHS = 4


def variant_epochs(batch_size, epochs):
    return epochs * LARGE_BATCH_EPOCHS if batch_size >= 512 else epochs


def print_variants_table(results):
    print()
    print("Batch-norm variants (test split, BN in evaluation mode with its running statistics):")
    header = (f"| {'run':<24} | {'batch':>5} | {'batches':<9} | {'epochs':>6} | {'steps':>5} "
              f"| {'test loss':>9} | {'test acc':>8} | {'best acc':>8} | {'time':>6} |")
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for name, r in results.items():
        cfg = r["config"]
        loss = "diverged" if r["diverged"] else f"{r['final_loss']:.4g}"
        best = max(a for a in r["test_acc"] if a == a)
        print(f"| {name:<24} | {cfg['batch_size']:>5} | {cfg['batches']:<9} "
              f"| {len(r['test_acc']):>6} | {r['steps']:>5} | {loss:>9} | {r['final_acc']:>8.1%} "
              f"| {best:>8.1%} | {r['seconds']:>5.1f}s |")


def plot_variants(results, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    pairs = [names[i:i + 2] for i in range(0, len(names), 2)]
    fig, axes = plt.subplots(2, len(pairs), figsize=(4.5 * len(pairs), 7), squeeze=False)
    for column, pair in enumerate(pairs):
        ax_acc, ax_loss = axes[0][column], axes[1][column]
        for name, style in zip(pair, ("--", "-")):
            r = results[name]
            ep = np.arange(1, len(r["test_acc"]) + 1)
            ax_acc.plot(ep, np.asarray(r["test_acc"]) * 100, style, marker="o", ms=2,
                        label=f"{name}: {r['final_acc']:.1%}")
            ax_loss.plot(ep, r["test_loss"], style, marker="o", ms=2,
                         label=f"{name}: {r['final_loss']:.3g}")
        ax_acc.set_ylabel("test accuracy (%)")
        ax_acc.set_ylim(0, 100)
        ax_loss.set_ylabel("test loss")
        ax_loss.set_yscale("log")
        for ax in (ax_acc, ax_loss):
            ax.set_xlabel("epoch")
            ax.grid(alpha=0.3)
            ax.legend(loc="lower right" if ax is ax_acc else "upper right", fontsize=8)
    fig.suptitle("cybn.BatchNorm2d variants on sklearn digits (dashed: plain batch norm)")
    fig.tight_layout()
    fig.savefig(out, dpi=80)
    plt.close(fig)


def main_variants(args, data):
    """Train VARIANT_RUNS; print their table and plot their curves."""
    results = {}
    for name, batch_size, batches, options, lr in VARIANT_RUNS:
        cfg = {"name": name, "bn": True, "lr": lr, "init_scale": 1.0, "bn_options": options,
               "batch_size": batch_size, "batches": batches}
        epochs = variant_epochs(batch_size, args.epochs)
        hist, _ = train_run(cfg, data, epochs, args.seed, batch_size,
                            progress=not args.no_progress)
        hist["config"] = cfg
        hist["steps"] = epochs * len(batch_indices(np.random.default_rng(0), data[2],
                                                   batch_size, batches))
        results[name] = hist
    print_variants_table(results)
    plot_variants(results, args.out)
    print(f"Curves written to {args.out}")
    return results


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=None, help="epochs per run (default 15, or 3 with --quick)")
    ap.add_argument("--seed", type=int, default=0, help="seed for the split, the init and the batch order")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="a few epochs only, for smoke tests")
    ap.add_argument("--out", default="train_digits.png", help="where to write the PNG of the curves")
    ap.add_argument("--save-model", default=None, metavar="PATH.npz",
                    help="also keep the trained 'BN lr=0.05' model here (default: a temporary file)")
    ap.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ap.add_argument("--variants", action="store_true",
                    help="compare plain BN with batch renormalization and ghost batches instead")
    args = ap.parse_args(argv)
    if args.epochs is None:
        args.epochs = 3 if args.quick else 15
    return args


def main(argv=None):
    args = parse_args(argv)
    data = load_data(args.seed)
    if args.variants:
        print(f"sklearn digits: {len(data[0])} train / {len(data[1])} test images, 8x8, "
              f"float32; {args.epochs} epochs per run ({LARGE_BATCH_EPOCHS}x at batch 512), "
              f"seed {args.seed}")
        return main_variants(args, data)
    print(f"sklearn digits: {len(data[0])} train / {len(data[1])} test images, 8x8, float32; "
          f"{args.epochs} epochs per run, batch size {args.batch_size}, seed {args.seed}")

    t_start = time.perf_counter()
    results = {}
    for name, bn, lr, init_scale in RUNS:
        cfg = {"name": name, "bn": bn, "lr": lr, "init_scale": init_scale}
        hist, model = train_run(cfg, data, args.epochs, args.seed, args.batch_size,
                                progress=not args.no_progress)
        hist["config"] = cfg
        if bn:
            with tempfile.TemporaryDirectory() as tmp:
                path = args.save_model if (args.save_model and name == "BN lr=0.05") \
                    else os.path.join(tmp, "model.npz")
                before, after, diff = check_state_dict_roundtrip(model, cfg, data, args.seed, path)
            ok = before == after
            print(f"  state_dict round trip via .npz ({name}): eval accuracy {before:.2%} -> "
                  f"{after:.2%} in a fresh model, max |logit diff| {diff:.2g}: {'OK' if ok else 'MISMATCH'}")
            hist["reload_acc"] = after
            hist["reload_ok"] = ok
        results[name] = hist
    elapsed = time.perf_counter() - t_start

    print_table(results, args.epochs)
    bn_acc = results["BN lr=0.05"]["final_acc"]
    print(f"\nWith BN (lr=0.05) the test accuracy is {bn_acc:.2%}; all runs took {elapsed:.1f}s.")
    plot(results, args.out)
    print(f"Curves written to {args.out}")
    return results


if __name__ == "__main__":
    main()
