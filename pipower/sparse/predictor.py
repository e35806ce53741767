"""Per-layer activation predictors: fc1 (D -> r, no bias) -> ReLU -> fc2 (r -> F, with bias) -> logits.

PowerInfer's shape, trained here in NumPy (its training code was never released). Input: the residual
stream before the FFN norm, RMS-normalised without weights (x / rms(x)) so one learning rate suits every
layer although the residual's scale grows with depth. A neuron is computed iff logit >= tau_pred.
Training: weighted binary cross-entropy (positives weighted up so recall is favoured), minibatch Adam,
held-out split, best epoch kept by held-out loss.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..errors import InvalidArgumentError
from .files import open_tensors, save_tensors
from .oracle import CountingSelector

log = logging.getLogger(__name__)
FORMAT = "pipower-predictors"


def normalise(x: np.ndarray) -> np.ndarray:
    """[n, D] -> x / rms(x), float32."""
    x = x.astype(np.float32, copy=False)
    return x / np.sqrt(np.mean(x * x, axis=1, keepdims=True) + np.float32(1e-6))


@dataclass
class LayerPredictor:
    fc1: np.ndarray        # float32 [r, D]
    fc2: np.ndarray        # float32 [F, r]
    b2: np.ndarray         # float32 [F]

    def logits(self, x: np.ndarray) -> np.ndarray:
        """x: residual [T, D] -> logits float32 [T, F]."""
        return np.maximum(normalise(x) @ self.fc1.T, 0) @ self.fc2.T + self.b2


@dataclass
class TrainConfig:
    rank: int = 256              # r; PowerInfer used ~1/3-1/2 of D for LLaMA-7B
    epochs: int = 12
    min_steps: int = 0           # more epochs when needed to reach this many Adam steps (small sample sets)
    batch: int = 1024
    lr: float = 1e-3
    pos_weight: float = 3.0      # weight of active-neuron terms in the BCE: >1 favours recall
    holdout: float = 0.1
    seed: int = 0

    def epochs_for(self, n: int) -> int:
        """Epochs trained on n samples: `epochs`, or more until `min_steps` minibatch steps are done. With
        few samples a fixed epoch count is a handful of steps (1719 rows: 24), far from converged."""
        fit = n - max(int(n * self.holdout), 1)
        steps_per_epoch = max(-(-fit // self.batch), 1)
        return max(self.epochs, -(-self.min_steps // steps_per_epoch))


@dataclass
class LayerReport:
    recall: float                # of truly active neurons, fraction predicted active (held out)
    precision: float             # of predicted active, fraction truly active
    predicted_sparsity: float    # fraction of neurons predicted inactive (what gets skipped)
    true_sparsity: float
    loss: float

    def as_dict(self):
        return {k: round(float(v), 5) for k, v in self.__dict__.items()}


def evaluate(pred: LayerPredictor, x: np.ndarray, y: np.ndarray, tau_pred: float = 0.0) -> LayerReport:
    """Metrics of one layer's predictor on inputs x [n, D] with labels y bool [n, F]."""
    z = pred.logits(x)
    p = z >= tau_pred
    tp = np.logical_and(p, y).sum()
    loss = float(np.mean(np.logaddexp(0, -z) * y + np.logaddexp(0, z) * ~y))
    return LayerReport(recall=tp / max(y.sum(), 1), precision=tp / max(p.sum(), 1),
                       predicted_sparsity=1 - p.mean(), true_sparsity=1 - y.mean(), loss=loss)


def train_layer(x: np.ndarray, y: np.ndarray, cfg: TrainConfig, progress=None) -> tuple[LayerPredictor, LayerReport]:
    """x: float [n, D] residual rows, y: bool [n, F] labels -> (predictor, held-out report)."""
    n, D = x.shape
    F = y.shape[1]
    if n < 10:
        raise InvalidArgumentError(f"need at least 10 samples to train a predictor, got {n}")
    rng = np.random.default_rng(cfg.seed)
    order = rng.permutation(n)
    n_hold = max(int(n * cfg.holdout), 1)
    hold, fit = order[:n_hold], order[n_hold:]
    xn = normalise(x)
    yf = y.astype(np.float32)
    r = min(cfg.rank, D)
    # He init for the ReLU layer; fc2 starts small, its bias at the label base rate's logit
    params = {
        "fc1": (rng.standard_normal((r, D)) * np.sqrt(2 / D)).astype(np.float32),
        "fc2": (rng.standard_normal((F, r)) * np.sqrt(1 / r) * 0.1).astype(np.float32),
        "b2": np.log(np.clip(yf[fit].mean(0), 1e-4, 1 - 1e-4) / np.clip(1 - yf[fit].mean(0), 1e-4, 1)).astype(np.float32),
    }
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    b1, b2, eps, step = np.float32(0.9), np.float32(0.999), np.float32(1e-8), 0
    best, best_loss = None, np.inf
    for epoch in range(cfg.epochs_for(n)):
        rng.shuffle(fit)
        for s in range(0, len(fit), cfg.batch):
            b = fit[s:s + cfg.batch]
            xb, yb = xn[b], yf[b]
            a = xb @ params["fc1"].T                                    # [B, r]
            hdn = np.maximum(a, 0)
            z = hdn @ params["fc2"].T + params["b2"]                    # [B, F]
            sig = 1 / (1 + np.exp(-z))
            # d/dz of weighted BCE: w_pos * y * (sig - 1) + (1 - y) * sig, averaged over the batch
            w = np.where(yb > 0, np.float32(cfg.pos_weight), np.float32(1))
            dz = (w * (sig - yb)).astype(np.float32) / np.float32(len(b))
            grads = {"fc2": dz.T @ hdn, "b2": dz.sum(0)}
            dh = (dz @ params["fc2"]) * (a > 0)
            grads["fc1"] = dh.T @ xb
            step += 1
            for k in params:
                m[k] = b1 * m[k] + (1 - b1) * grads[k]
                v[k] = b2 * v[k] + (1 - b2) * grads[k] * grads[k]
                mhat = m[k] / (1 - b1 ** step)
                vhat = v[k] / (1 - b2 ** step)
                params[k] -= np.float32(cfg.lr) * mhat / (np.sqrt(vhat) + eps)
        pred = LayerPredictor(params["fc1"].copy(), params["fc2"].copy(), params["b2"].copy())
        held = evaluate(pred, x[hold], y[hold])
        if held.loss < best_loss:
            best, best_loss = pred, held.loss
        if progress is not None:
            progress(epoch)
    return best, evaluate(best, x[hold], y[hold])


@dataclass
class Predictors:
    layers: list                          # LayerPredictor per layer, numeric order
    reports: list = field(default_factory=list)   # LayerReport per layer (held out, tau_pred = 0)
    meta: dict = field(default_factory=dict)

    def save(self, path) -> None:
        tensors = {}
        for i, p in enumerate(self.layers):
            tensors[f"layer.{i}.fc1"], tensors[f"layer.{i}.fc2"], tensors[f"layer.{i}.b2"] = p.fc1, p.fc2, p.b2
        save_tensors(path, tensors, {**self.meta, "format": FORMAT, "n_layers": len(self.layers),
                                     "reports": [r.as_dict() for r in self.reports]})

    @classmethod
    def load(cls, path) -> Predictors:
        with open_tensors(path, FORMAT, "predictor") as (meta, f):
            layers = [LayerPredictor(f.get_tensor(f"layer.{i}.fc1"), f.get_tensor(f"layer.{i}.fc2"),
                                     f.get_tensor(f"layer.{i}.b2")) for i in range(meta["n_layers"])]
        reports = [LayerReport(**r) for r in meta.get("reports", [])]
        return cls(layers, reports, meta)


class PredictorSelector(CountingSelector):
    """Neuron selector (Transformer.ffn_neurons) from trained predictors: computed iff logit >= tau_pred.

    With `ops` (the model's ops) the predictors run through `ops.linear` with fc1/fc2 stored in
    `weights` (a format of pipower.quant, e.g. the model's q8): the predictor is read every token like
    the model's own matrices, so it gets the same compact formats and kernels. float32 NumPy
    predictors cost ~2.9 MB per Qwen2.5-0.5B layer per token (a quarter of the q8 model's bytes), which
    ate the FFN savings; in q8 they read 3.8x less. Without `ops` (or with "f32") the logits are the
    trainer's exact float32 ones.
    """

    def __init__(self, predictors: Predictors, tau_pred: float = 0.0, *, ops=None, weights: str = "f32"):
        super().__init__()
        self.predictors, self.tau = predictors, np.float32(tau_pred)
        self.ops, self.weights = ops, weights
        self._stored = None
        if ops is not None:
            from ..model import store
            # ops.place: on the hybrid engine the predictors live on the GPU with attention
            self._stored = [(ops.place(store(p.fc1, self._format_for(p.fc1, weights))),
                             ops.place(store(p.fc2, self._format_for(p.fc2, weights))), ops.place(p.b2))
                            for p in predictors.layers]

    @staticmethod
    def _format_for(w: np.ndarray, weights: str) -> str:
        """Block formats need K % 32 == 0; a predictor rank that is not a multiple of 32 stays f32."""
        if weights != "f32" and w.shape[1] % 32:
            log.info("predictor matrix %s: K not a multiple of 32, kept in f32", w.shape)
            return "f32"
        return weights

    def logits(self, layer: int, x: np.ndarray) -> np.ndarray:
        """x: residual [T, D] -> logits float32 [T, F]."""
        if self._stored is None:
            return self.predictors.layers[layer].logits(x)
        fc1, fc2, b2 = self._stored[layer]
        hidden = self.ops.linear(normalise(x), fc1)                   # [T, r]
        np.maximum(hidden, 0, out=hidden)
        return self.ops.linear(hidden, fc2, b2)                       # [T, F]

    def __call__(self, layer: int, x: np.ndarray, h: np.ndarray):
        fused = getattr(self.ops, "predict_active", None)       # the CPU engine's one-call decode path
        if fused is not None and self._stored is not None and x.shape[0] == 1 and np.isfinite(self.tau):
            fc1, fc2, b2 = self._stored[layer]
            idx = fused(fc1, fc2, b2, x, self.tau)
            return self.select_indices(idx, fc2.shape[0])
        return self.select(self.logits(layer, x) >= self.tau)                             # bool [T, F]


def train_predictors(stats, cfg: TrainConfig, *, target_recall: float | None = None, max_rank: int = 1024,
                     layer_done=None, epoch_done=None) -> Predictors:
    """Train one predictor per layer from an ActivationStats' samples (numeric layer order).

    target_recall: if a layer's held-out recall at tau_pred = 0 falls short, retrain it with double the
    rank (up to max_rank). layer_done: callable(layer, report) for progress display; epoch_done:
    callable(layer, rank, epoch) after every epoch (a retrain at a higher rank starts again at epoch 0),
    for a progress bar with a time estimate: the work is n_layers * cfg.epochs_for(samples) epochs, plus
    retrains.
    """
    layers, reports = [], []
    for i in range(stats.n_layers):
        x, y = stats.inputs[i].astype(np.float32), stats.layer_labels(i)
        rank = cfg.rank
        while True:
            tick = None if epoch_done is None else (lambda e, i=i, r=rank: epoch_done(i, r, e))
            pred, report = train_layer(x, y, TrainConfig(**{**cfg.__dict__, "rank": rank, "seed": cfg.seed + i}),
                                       progress=tick)
            if target_recall is None or report.recall >= target_recall or rank * 2 > min(max_rank, x.shape[1]):
                break
            rank *= 2
        layers.append(pred)
        reports.append(report)
        if layer_done is not None:
            layer_done(i, report)
    meta = {"model_fingerprint": stats.meta.get("model_fingerprint"), "stats_tau_act": stats.tau_act.tolist(),
            "train": cfg.__dict__, "target_recall": target_recall, "samples": int(stats.inputs[0].shape[0])}
    return Predictors(layers, reports, meta)
