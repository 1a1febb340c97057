"""--cuda-graphs: one training step of confident.py's Trainer captured into one CUDA graph and replayed.

Loaded by confident.py only when --cuda-graphs asks for it (like the Triton kernels beside it); it needs
nothing but torch. `GraphedStep(trainer)` is called like `trainer.step` and returns the same logs.
"""
import time
import warnings

import torch


def _rng_state() -> dict:                                # the generators a training step draws from
    s = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def uncapturable(cfg, name=lambda f: "--" + f.replace("_", "-")) -> str | None:
    """Why cfg's step cannot be one CUDA graph (a graph replays fixed shapes and the numbers it was captured with);
    name(field) names a Config field in the answer (the CLI: its flag). replay and beta_warmup are stability.py's."""
    if getattr(cfg, "replay", 0):
        return f"cannot capture {name('replay')} (its buffer changes size every step)"
    if getattr(cfg, "beta_warmup", 0):
        return (f"cannot capture {name('beta_warmup')} (beta is a number baked into the graph, and it changes "
                "every step)")
    return None


def set_capturable(opt: torch.optim.Optimizer, on: bool) -> None:
    """Adam inside a CUDA graph keeps its step counts on the device and never reads them on the host
    (capturable=True); eager Adam keeps them on the CPU. Sets the flag and moves the counts."""
    for g in opt.param_groups:
        g["capturable"] = on
        for p in g["params"]:
            st = opt.state.get(p, {})
            if "step" in st:
                st["step"] = st["step"].to(p.device if on else "cpu")


def _step_state(tr):
    """Every tensor a training step updates in place: weights and buffers (BatchNorm statistics, spectral norm's
    vectors, G's EMA) of each module, and Adam's state per parameter (a dict, empty before Adam's first step)."""
    return ([t for m in tr.raw.values() for t in m.state_dict().values()],
            [o.state.get(p, {}) for o in tr.opts.values() for g in o.param_groups for p in g["params"]])


def snapshot(tr) -> dict:
    tensors, opt_states = _step_state(tr)
    return {"tensors": [t.clone() for t in tensors], "opt": [{k: v.clone() for k, v in s.items()} for s in opt_states],
            "rng": _rng_state(), "global_step": tr.global_step}


@torch.no_grad()
def restore(tr, snap: dict) -> None:
    """Put a snapshot back into the same tensors (a captured graph holds their addresses). Adam state made
    since is zeroed: zero moments and step count 0 is exactly Adam's state before its first step."""
    tensors, opt_states = _step_state(tr)
    for t, s in zip(tensors, snap["tensors"]):
        t.copy_(s)
    for st, s in zip(opt_states, snap["opt"]):
        for k, v in st.items():
            v.copy_(s[k]) if k in s else v.zero_()
    _set_rng_state(snap["rng"])
    tr.global_step = snap["global_step"]


class GraphedStep:
    """tr.step as one CUDA graph replay (--cuda-graphs). At the paper's batch of 128 a step is bound by kernel
    launches and Python; a replay launches the whole step at once: D, G and classifier forward, backward and Adam
    updates, dropout and BatchNorm included. Called like tr.step, it returns the same logs (copies: the next
    replay overwrites the graph's own output tensors).

    PyTorch's whole-network recipe: a few eager steps on a side stream (kernels chosen, Triton compiled, Adam
    state made), grads set to None so that backward allocates them from the graph's private memory, one capture
    of tr.step on static input buffers, which every call fills with copy_. Warm-up and capture leave no trace:
    weights, buffers, Adam state, the RNG and the step counter are put back, so replay i computes eager step i
    (the graph draws dropout masks and GAN noise from the same generator at the same offsets, advancing it as
    eager steps do). What a capture bakes in (the learning rates, conf-gan's phase, the batch's shape) is
    compared on every call, and a change, such as the lr drop, captures again: simpler than learning rates as
    device tensors, at one capture per change. A step that cannot be captured trains eagerly, with one line
    saying why; nothing crashes."""

    WARMUP = 3                                           # eager steps before capture (PyTorch's docs: a few)

    def __init__(self, tr, log=print, world: int = 1):
        self.tr, self.log = tr, log
        self.graph = self.key = None
        self.why_not = ("needs a CUDA device" if tr.device.type != "cuda"
                        else f"does not work with DistributedDataParallel ({world} processes)" if world > 1
                        else uncapturable(tr.cfg))
        if self.why_not:
            log(f"--cuda-graphs {self.why_not}: training eagerly")

    def _key(self, x, x_out) -> tuple:
        tr = self.tr
        return (tr.cfg.method == "conf-gan" and tr.epoch < tr.cfg.gan_epochs,
                tuple(g["lr"] for o in tr.opts.values() for g in o.param_groups),
                x.shape, x.stride(), None if x_out is None else (x_out.shape, x_out.stride()))

    def __call__(self, x, y, x_out=None) -> dict:
        if not self.why_not and self._key(x, x_out) != self.key:
            self._capture(x, y, x_out)
        if self.why_not:
            return self.tr.step(x, y, x_out)
        self.x.copy_(x)
        self.y.copy_(y)
        if x_out is not None:
            self.x_out.copy_(x_out)
        self.graph.replay()
        self.tr.global_step += 1                         # the one line of tr.step the graph cannot replay
        return dict(zip(self.names, self.out.clone().unbind()))

    def _capture(self, x, y, x_out):
        tr, t0, key = self.tr, time.time(), self._key(x, x_out)
        self.graph = self.out = None                     # a previous graph and its memory go first
        for o in tr.opts.values():
            o.zero_grad(set_to_none=True)
            set_capturable(o, True)
        self.x, self.y = x.clone(), y.clone()            # the static inputs (clone keeps channels_last)
        self.x_out = None if x_out is None else x_out.clone()
        saved = snapshot(tr)
        try:
            self.graph, self.out, self.names = self._record()
            self.key = key
        except Exception as e:
            while e.__context__ is not None:             # the step's own error, not capture_end's after it
                e = e.__context__
            msg = (str(e).strip().splitlines() or [""])[0]
            self.why_not = f"could not capture the {tr.cfg.method} step ({type(e).__name__}: {msg})"
        restore(tr, saved)
        if self.why_not:
            for o in tr.opts.values():
                o.zero_grad(set_to_none=True)
                set_capturable(o, False)
            self.graph = self.out = self.x = self.y = self.x_out = None
            self.log(f"--cuda-graphs {self.why_not}: training eagerly")
        else:
            self.log(f"--cuda-graphs: captured the {tr.cfg.method} step (batch {len(x)}) in {time.time() - t0:.1f}s")

    def _record(self):
        """PyTorch's whole-network capture of tr.step on the static inputs: (graph, stacked logs, their names)."""
        tr, stream = self.tr, torch.cuda.current_stream()
        try:
            side = torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", ".*capturable=True")    # Adam: "runs uncaptured" (on purpose)
                for _ in range(self.WARMUP):
                    tr.step(self.x, self.y, self.x_out)
            stream.wait_stream(side)
            for o in tr.opts.values():                   # so that backward allocates them inside the graph
                o.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logs = tr.step(self.x, self.y, self.x_out)
                out = torch.stack([v.float() for v in logs.values()])
            return graph, out, list(logs)
        finally:
            torch.cuda.set_stream(stream)                # a failed capture can leave its own stream current
            torch.cuda.synchronize()
