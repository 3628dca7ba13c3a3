"""Writes the clipax notebooks from the cell sources below, without outputs.

    python notebooks/_build.py            # rewrite every notebook listed in NOTEBOOKS
    python notebooks/_build.py cliff      # rewrite one

Every notebook opens with a title and a Colab badge, an install cell that only does something on
Colab, and a parameter cell (Colab ``# @param`` fields) whose ``QUICK`` switch is also turned on
by the environment variable ``CLIPAX_NOTEBOOK_QUICK=1`` (``tests/test_notebooks.py`` sets it).
Edit the sources here, run this script, and commit the ``.ipynb`` files it writes.
"""

from __future__ import annotations

import pathlib
import sys
import textwrap

import nbformat

HERE = pathlib.Path(__file__).resolve().parent
REPO = "clipax/clipax"
QUICK_ENV = "CLIPAX_NOTEBOOK_QUICK"


def md(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip())


def code(text: str) -> nbformat.NotebookNode:
  return nbformat.v4.new_code_cell(textwrap.dedent(text).strip())


def header(name: str, title: str, intro: str) -> list[nbformat.NotebookNode]:
  badge = (
      "[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
      f"(https://colab.research.google.com/github/{REPO}/blob/main/notebooks/{name}.ipynb)"
  )
  install = code(f"""
      # On Colab, install clipax and the demo extras; anywhere else this cell does nothing
      # (install with `pip install -e '.[notebooks]'` from a checkout instead).
      import subprocess
      import sys

      if "google.colab" in sys.modules:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q",
             "clipax[demo] @ git+https://github.com/{REPO}"],
            check=True,
        )
      """)
  return [md(f"# {title}\n\n{badge}\n\n" + textwrap.dedent(intro).strip()), install]


def parameters(fields: str, quick: str) -> nbformat.NotebookNode:
  """The parameter cell: Colab form fields, then the quick-mode override."""
  return code(
      textwrap.dedent(fields).strip()
      + f"""

# Quick mode: a small version that runs in seconds on a CPU (tests set {QUICK_ENV}=1).
import os

if os.environ.get("{QUICK_ENV}") == "1":
  QUICK = True
"""
      + textwrap.dedent(quick).strip()
  )


def environment() -> nbformat.NotebookNode:
  return code("""
      import jax

      import clipax

      print(f"clipax {clipax.__version__}, jax {jax.__version__}, backend {jax.default_backend()}")
      print(jax.devices())
      """)


# ----------------------------------------------------------------------------------- quickstart


def quickstart() -> list[nbformat.NotebookNode]:
  return [
      *header(
          "quickstart",
          "clipax quickstart",
          """
          clipax is gradient clipping for JAX and Optax: every clipper is an
          `optax.GradientTransformation` that measures the gradient in float32, clips it, and
          records what it did (the pre-clip norm, whether it clipped, how often, how many
          non-finite gradients it has seen) in its state. This notebook shows

          1. clipping as one link of an `optax.chain`, and reading the metrics back;
          2. what happens to a NaN or Inf gradient;
          3. the same in a Flax NNX training loop (`nnx.Optimizer`) and in a Flax Linen one
             (`flax.training.train_state.TrainState`);
          4. `clipax.diagnose`: is the threshold doing anything, or too much?

          Everything runs unchanged on CPU, GPU or TPU.
          """,
      ),
      parameters(
          """
          QUICK = False  # @param {type:"boolean"}
          STEPS = 400  # @param {type:"integer"}
          MAX_NORM = 1.0  # @param {type:"number"}
          LEARNING_RATE = 3e-3  # @param {type:"number"}
          HIDDEN = 64  # @param {type:"integer"}
          """,
          """
          if QUICK:
            STEPS, HIDDEN = min(STEPS, 60), min(HIDDEN, 16)
          """,
      ),
      environment(),
      md("""
          ## 1. Clipping is one link of an `optax.chain`

          Put the clipper before the optimizer: it sees the raw gradient, and the optimizer sees
          the clipped one. `clipax.metrics` finds the clipper's state anywhere inside the optax
          state and returns a flat `dict` of scalars, ready for any logger (and usable inside
          `jax.jit`).
          """),
      code("""
          import jax.numpy as jnp
          import numpy as np
          import optax

          tx = optax.chain(clipax.clip_by_global_norm(MAX_NORM), optax.adamw(LEARNING_RATE))
          params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
          opt_state = tx.init(params)

          grads = {"w": jnp.full((3, 2), 2.0), "b": jnp.array([3.0, -4.0])}
          updates, opt_state = jax.jit(tx.update)(grads, opt_state, params)
          params = optax.apply_updates(params, updates)

          m = clipax.metrics(opt_state)
          for key, value in m.items():
            print(f"{key:22s} {value}")
          """),
      md("""
          Keys are `clip/{name}/{metric}`, the name being the clipper's kind here
          (`global_norm`). `norm` is the norm *before* clipping, `update_norm` after it, `scale`
          the factor applied (`min(1, max_norm / norm)`), `threshold` the one in force and
          `clip_rate` the fraction of steps clipped so far.
          The norm is the one `clipax.global_norm` computes, and numpy agrees:
          """),
      code("""
          flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float64)
          print(f"metrics {float(m['clip/global_norm/norm']):.6f}")
          print(f"clipax.global_norm {float(clipax.global_norm(grads)):.6f}")
          print(f"numpy float64 {np.linalg.norm(flat):.6f}")
          """),
      md("""
          With several clippers in one chain each gets its own name in the keys: the `name=`
          argument, else its `optax.named_chain` key, else its kind (`zclip`, `global_norm`), so
          adding a clipper never renames another's keys. Each reports the threshold in force, the
          adaptive ones the threshold they learned. Here ZClip learns the normal range of the global
          norm over a 5-step warm-up and clips the spike on step 8 back into it, while a fixed
          `clip_by_global_norm(10.0)` behind it stays as a hard cap:
          """),
      code("""
          tx2 = optax.chain(
              clipax.zclip(warmup_steps=5, max_norm=None),
              clipax.clip_by_global_norm(10.0),
              optax.adamw(LEARNING_RATE),
          )
          state2 = tx2.init(params)
          update2 = jax.jit(tx2.update)
          key = jax.random.key(1)
          print("step  norm in  threshold  zclip clipped  norm after zclip")
          for i in range(10):
            scale = 30.0 if i == 8 else 1.0  # a spike on step 8
            g = jax.tree.map(
                lambda x: scale * jax.random.normal(jax.random.fold_in(key, i), x.shape), params
            )
            _, state2 = update2(g, state2, params)
            m2 = clipax.metrics(state2)
            print(f"{i:4d} {float(m2['clip/zclip/norm']):8.3f}"
                  f" {float(m2['clip/zclip/threshold']):10.3f}"
                  f" {bool(m2['clip/zclip/clipped'])!s:>14}"
                  f" {float(m2['clip/global_norm/norm']):17.3f}")
          print(sorted(m2))
          """),
      md("""
          ## 2. NaN and Inf gradients

          A single `inf` in the gradient makes its norm infinite. `optax.clip_by_global_norm`
          then multiplies the gradient by `max_norm / inf = 0`, and `inf * 0` is NaN: the NaN
          reaches the weights. clipax's default `nonfinite="zero"` turns such a step into a zero
          update and counts it in `clip/global_norm/nonfinite_count`, so the run goes on and the
          event shows up in the logs.
          """),
      code("""
          bad = {"w": jnp.ones((3, 2)).at[0, 0].set(jnp.inf), "b": jnp.ones(2)}

          for name, clipper in [
              ("optax", optax.clip_by_global_norm(MAX_NORM)),
              ("clipax", clipax.clip_by_global_norm(MAX_NORM)),
          ]:
            tx3 = optax.chain(clipper, optax.sgd(0.1))
            state3 = tx3.init(params)
            updates3, state3 = jax.jit(tx3.update)(bad, state3, params)
            new = optax.apply_updates(params, updates3)
            finite = all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(new))
            print(f"{name:7s} params finite after the step: {finite}")

          m3 = clipax.metrics(state3)
          print("clipax nonfinite_count:", int(m3["clip/global_norm/nonfinite_count"]))
          """),
      md("""
          ## 3. Flax NNX: `nnx.Optimizer`

          A small MLP regresses a smooth function; one batch in 25 has corrupted labels (times
          30), the kind of outlier batch that makes the gradient norm spike. The clipper is just
          part of the `tx` handed to `nnx.Optimizer`; the metrics are read from
          `nnx.as_pure(optimizer.opt_state)` inside the jitted step, so logging them costs no
          extra device round trip.
          """),
      code("""
          from flax import nnx

          IN = 8


          def batch(step, size=128):
            kx, kn = jax.random.split(jax.random.fold_in(jax.random.key(0), step))
            x = jax.random.normal(kx, (size, IN))
            y = jnp.sin(x[:, :1] * 2.0) + 0.5 * x[:, 1:2] * x[:, 2:3]
            y = y + 0.05 * jax.random.normal(kn, y.shape)
            return x, jnp.where(corrupted(step), 30.0 * y, y)


          def corrupted(step):
            return step % 25 == 24


          def clean_loss(losses, last=20):  # mean loss over the last clean batches
            clean = [loss for step, loss in enumerate(losses) if not corrupted(step)]
            return float(np.mean(clean[-last:]))


          class MLP(nnx.Module):
            def __init__(self, din, dhidden, dout, *, rngs):
              self.hidden = nnx.Linear(din, dhidden, rngs=rngs)
              self.out = nnx.Linear(dhidden, dout, rngs=rngs)

            def __call__(self, x):
              return self.out(nnx.gelu(self.hidden(x)))


          @nnx.jit
          def train_step(model, optimizer, x, y):
            def loss_fn(model):
              return jnp.mean((model(x) - y) ** 2)

            loss, grads = nnx.value_and_grad(loss_fn)(model)
            optimizer.update(model, grads)
            return loss, clipax.metrics(nnx.as_pure(optimizer.opt_state))


          def fit_nnx(clipper, steps=STEPS):
            model = MLP(IN, HIDDEN, 1, rngs=nnx.Rngs(0))
            tx = optax.chain(clipper, optax.adamw(LEARNING_RATE))
            optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
            losses, history = [], []
            for step in range(steps):
              loss, m = train_step(model, optimizer, *batch(step))
              losses.append(loss)
              history.append(m)
            return model, optimizer, jax.device_get(losses), jax.device_get(history)


          model, optimizer, losses, history = fit_nnx(clipax.clip_by_global_norm(MAX_NORM))
          last = clipax.metrics(nnx.as_pure(optimizer.opt_state))
          print(f"loss on the last clean batches {clean_loss(losses):.4f}")
          print(f"clipped {int(last['clip/global_norm/clipped_count'])} "
                f"of {int(last['clip/global_norm/count'])} steps")
          """),
      code("""
          import matplotlib.pyplot as plt
          from matplotlib.ticker import FuncFormatter, NullFormatter

          norms = np.array([m["clip/global_norm/norm"] for m in history])
          clipped = np.array([bool(m["clip/global_norm/clipped"]) for m in history])
          loss = np.array(losses)
          steps = np.arange(len(norms))
          bad = np.array([corrupted(step) for step in steps])
          clean = loss[~bad]
          k = max(len(clean) // 10, 1)

          fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2), layout="constrained")
          ax1.plot(steps, norms, lw=1, color="tab:blue", label="pre-clip gradient norm")
          ax1.plot(steps[clipped], norms[clipped], "o", ms=6, mfc="none", mec="tab:red", mew=1.3,
                   label=f"clipped step ({clipped.sum()} of {len(norms)})")
          ax1.axhline(MAX_NORM, color="k", ls="--", lw=1, label=f"max_norm = {MAX_NORM:g}")
          ax1.set_ylabel("global gradient norm before clipping\\n(log scale)")
          ax1.set_title(f"clipped: {np.sum(clipped & bad)} of {bad.sum()} corrupted batches, "
                        f"{np.sum(clipped & ~bad)} of {np.sum(~bad)} clean ones", fontsize=10)
          ax2.plot(steps[~bad], clean, lw=1, color="tab:blue", label="clean batches")
          ax2.plot(steps[bad], loss[bad], "x", ms=8, mew=1.5, color="tab:red",
                   label="corrupted batches (labels x 30)")
          ax2.set_ylabel("training loss: mean squared error\\n(log scale)")
          ax2.set_title(f"clean-batch loss {clean[:k].mean():.3f} (first {k}) -> "
                        f"{clean[-k:].mean():.3f} (last {k})", fontsize=10)
          for ax in (ax1, ax2):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.yaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("training step")
            ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=3)
          fig.suptitle(f"clip_by_global_norm({MAX_NORM:g}) cuts the corrupted batches' gradients "
                       f"(norms up to {norms.max():.0f}) down to the threshold")
          plt.show()
          """),
      md("""
          ## 4. Flax Linen: `train_state.TrainState`

          The same clipper in a `TrainState`: it lives in `state.tx`, its state in
          `state.opt_state`, and `clipax.metrics(state.opt_state)` reads it.
          """),
      code("""
          import flax.linen as nn
          from flax.training import train_state


          class LinenMLP(nn.Module):
            hidden: int

            @nn.compact
            def __call__(self, x):
              return nn.Dense(1)(nn.gelu(nn.Dense(self.hidden)(x)))


          module = LinenMLP(HIDDEN)
          state = train_state.TrainState.create(
              apply_fn=module.apply,
              params=module.init(jax.random.key(0), jnp.zeros((1, IN)))["params"],
              tx=optax.chain(clipax.clip_by_global_norm(MAX_NORM), optax.adamw(LEARNING_RATE)),
          )


          @jax.jit
          def linen_step(state, x, y):
            def loss_fn(params):
              return jnp.mean((state.apply_fn({"params": params}, x) - y) ** 2)

            loss, grads = jax.value_and_grad(loss_fn)(state.params)
            state = state.apply_gradients(grads=grads)
            return state, loss, clipax.metrics(state.opt_state)


          linen_losses = []
          for step in range(STEPS):
            state, loss, m = linen_step(state, *batch(step))
            linen_losses.append(loss)
          print(f"loss on the last clean batches {clean_loss(jax.device_get(linen_losses)):.4f}, "
                f"clip rate {float(m['clip/global_norm/clip_rate']):.2f}")
          """),
      md("""
          ## 5. Is the threshold right? `clipax.diagnose`

          `diagnose` reads the metrics (one dict, a list of them, or an optax state) and gives a
          verdict: `nonfinite` (NaN/Inf gradients were seen), `clipping_often` (most recent steps
          were clipped: the threshold is doing the learning rate's job), `never_clipping` (the
          threshold has caught nothing), or `healthy` (only the outliers are clipped).
          `suggest_max_norm` proposes a threshold just above the typical norms (1.2 x their 95th
          percentile), from norms logged with a loose threshold.
          """),
      code("""
          runs = {}  # name -> (loss on the last clean batches, diagnose status)


          def report(name, run_losses, run_history):
            verdict = clipax.diagnose(run_history)
            runs[name] = (clean_loss(run_losses), verdict.status)
            print(f"{name}: loss on the last clean batches {runs[name][0]:.4f}")
            print("  ", verdict)


          BASE, TIGHT = f"max_norm={MAX_NORM:g}", f"max_norm={MAX_NORM / 100:g}"
          report(BASE, losses, history)

          _, _, tight_losses, tight = fit_nnx(clipax.clip_by_global_norm(MAX_NORM / 100))
          report(TIGHT, tight_losses, tight)

          _, _, loose_losses, loose = fit_nnx(clipax.clip_by_global_norm(1e6))
          report("max_norm=1e6 (never clips)", loose_losses, loose)
          suggested = clipax.suggest_max_norm([m["clip/global_norm/norm"] for m in loose])

          SUGGESTED = f"suggested max_norm={suggested:.3f}"
          _, _, tuned_losses, tuned = fit_nnx(clipax.clip_by_global_norm(suggested))
          report(SUGGESTED, tuned_losses, tuned)
          """),
      md("""
          What do these numbers say? The cell below ranks the four runs by their loss on the last
          clean batches and states, from this run's numbers, how far apart they are and where the
          suggested threshold and the one `diagnose` flags land.
          """),
      code("""
          ranked = sorted(runs.items(), key=lambda item: item[1][0])
          print("loss on the last clean batches, lowest first:")
          for name, (loss, status) in ranked:
            print(f"  {loss:.4f}  {name:30s} diagnose: {status}")
          (best, (low, _)), (worst, (high, _)) = ranked[0], ranked[-1]
          print(f"\\nThe threshold changes this loss {high / low:.1f}x: from {low:.4f} ({best}) "
                f"to {high:.4f} ({worst}).")
          tuned_loss, base_loss = runs[SUGGESTED][0], runs[BASE][0]
          print(f"The suggested threshold ({suggested:.3g}) ends at {tuned_loss:.4f}, "
                f"{max(tuned_loss, base_loss) / min(tuned_loss, base_loss):.2f}x "
                f"{'above' if tuned_loss > base_loss else 'below'} {BASE} ({base_loss:.4f}).")
          for name, (loss, status) in runs.items():
            if status == "clipping_often":
              rank = [n for n, _ in ranked].index(name) + 1
              print(f"{name} is flagged clipping_often; its loss ranks {rank} of {len(runs)} "
                    f"({'the lowest' if rank == 1 else 'not the lowest'}).")
          """),
      md("""
          How to read this. Every 25th batch here is corrupted, and its gradient is tens of times
          the usual norm, so the threshold decides how much of it reaches AdamW: the lower the
          threshold, the less, and the loss moves with the threshold by the factor printed
          above. A threshold below nearly every norm does not stop training either: AdamW divides
          each update by a running estimate of the gradient's scale, so clipping every step just
          feeds it gradients of one fixed length (normalized gradients), in which a corrupted
          batch weighs no more than a clean one. That is why the tightest threshold can end with
          a low loss although `diagnose` flags it `clipping_often`: it is a different optimizer
          (threshold and learning rate now set the step size together), not an outlier filter,
          and it should be a deliberate choice. With SGD the same threshold would directly
          replace the learning rate.

          `suggest_max_norm` aims at the other use of clipping: leave ordinary steps alone and cut
          only the outliers. Its threshold sits above most clean-batch norms (compare the clip
          rate in its verdict with one batch in 25), and a clipped corrupted gradient still
          reaches AdamW with the threshold's norm, so a higher threshold passes more of it.
          `diagnose`
          flags both ends (`clipping_often`, and `never_clipping` once `min_steps` have passed, or
          `unclipped_spikes`) so you can decide.
          """),
      md("""
          ## Where next

          * [`cliff.ipynb`](cliff.ipynb): why clip at all: gradient descent meets a cliff.
          * [`imbalance.ipynb`](imbalance.ipynb): what clipping buys on a rare class, and what
            it does not.
          * [`adaptive_spiky_lm.ipynb`](adaptive_spiky_lm.ipynb): adaptive thresholds and guards
            on a small language model with loss spikes.
          """),
  ]


# ----------------------------------------------------------------------------------------- cliff


def cliff() -> list[nbformat.NotebookNode]:
  return [
      *header(
          "cliff",
          "Gradient descent meets a cliff",
          """
          Why clip gradients at all? Pascanu, Mikolov and Bengio (2013) drew the picture: the loss
          surface of a recurrent network has long gentle stretches broken by near-vertical walls
          and cliffs. Where the loss changes that abruptly the gradient is suddenly enormous, and
          a gradient step is the gradient times the learning rate: the point is thrown far across
          the surface and the progress made so far is lost.

          This notebook runs the experiment in `clipax.experiments.cliff`: gradient descent on a
          2-D loss, a valley descending towards a minimum and cut by a cliff, from the same start
          with three arms: no clipping, `clipax.clip_by_global_norm` and `clipax.clip_by_value`.

          Reference: R. Pascanu, T. Mikolov, Y. Bengio, *On the difficulty of training recurrent
          neural networks*, ICML 2013, [arXiv:1211.5063](https://arxiv.org/abs/1211.5063).
          """,
      ),
      parameters(
          """
          QUICK = False  # @param {type:"boolean"}
          STEPS = 200  # @param {type:"integer"}
          LR = 0.1  # @param {type:"number"}
          MAX_NORM = 1.0  # @param {type:"number"}
          MAX_VALUE = 0.5  # @param {type:"number"}
          """,
          """
          if QUICK:
            STEPS = min(STEPS, 120)
          """,
      ),
      environment(),
      md("""
          ## The surface and the three descents

          The loss (see `cliff.Config` for every constant) is a valley along `y = 0` that slopes
          down towards its minimum at `x = target`, plus a cliff: a logistic step of height
          `wall_height` along an oblique line, steep enough (`wall_steepness`) to be nearly
          vertical, with the start on the high side. All three arms run plain gradient descent,
          `p <- p - lr * clip(grad)`:

          * **no clipping**: the raw gradient;
          * **`clip_by_global_norm(MAX_NORM)`**: the gradient rescaled to norm at most
            `MAX_NORM`, so every step is at most `LR * MAX_NORM` long and keeps its direction;
          * **`clip_by_value(MAX_VALUE)`**: each coordinate clipped to `[-MAX_VALUE, MAX_VALUE]`,
            which also bounds the step but bends its direction towards the diagonal.
          """),
      code("""
          import dataclasses
          import pathlib

          from IPython.display import Image, Markdown, display

          from clipax.experiments import cliff

          config = cliff.Config.quick() if QUICK else cliff.Config()
          config = dataclasses.replace(
              config, steps=STEPS, lr=LR, max_norm=MAX_NORM, max_value=MAX_VALUE
          )
          result = cliff.run(config)
          display(Markdown(cliff.table(result)))
          """),
      code("""
          for path in cliff.plot(result, pathlib.Path("figures")):
            display(Image(filename=str(path)))
          """),
      md("""
          ## What it shows

          Read the table and the plot together:

          * **No clipping.** The start is on a high plateau above the cliff. The descent walks
            downhill to the cliff's edge, where the gradient norm jumps by more than an order of
            magnitude (the `max grad norm` column). One step of `LR x` that norm (`max step`)
            throws the point far across the surface, up onto the valley's flat side, where the
            gradient is almost zero. It stays there: the loss settles on the height of the
            valley's sides instead of going down to its floor.
          * **Norm clipping.** Away from the edge the gradient is below the threshold and the
            steps are exactly those of plain gradient descent. At the edge every step is cut to
            length `LR * MAX_NORM` in the gradient's own direction: the point goes down the cliff
            a short step at a time and carries on along the valley to the minimum.
          * **Value clipping.** The steps are bounded too, but each coordinate is capped on its
            own, so the step turns away from the gradient (the angle column): for the same
            number of steps it gets less far down the valley. The second figure takes the
            gradient where that turn is largest and runs it through `clip_by_global_norm` and
            `clip_by_value`: the norm-clipped vector lands on the circle of radius `MAX_NORM` in
            the gradient's own direction, the value-clipped one on the edge of the box
            `[-MAX_VALUE, MAX_VALUE]^2`, at the angle printed on it.

          The numbers behind those sentences:
          """),
      code("""
          def fmt(x, digits=3):
            return "nan" if x is None else f"{x:.{digits}f}"


          for r in result["arms"].values():
            print(f"{r['name']:20s}  largest gradient norm {fmt(r['max_grad_norm'], 1):>6}  "
                  f"longest step {fmt(r['max_step'])}  final loss {fmt(r['final_loss'])}  "
                  f"mean angle to the gradient {fmt(r['mean_angle_deg'], 1)} deg")
          print()
          print(f"norm clipping bounds every step by LR * MAX_NORM = {LR * MAX_NORM:.3f}")
          ex = result["value_vs_norm"]
          vec = lambda v: "(" + ", ".join(fmt(x) for x in v) + ")"
          print(f"the gradient of step {ex['step']} {vec(ex['grad'])}: norm-clipped "
                f"{vec(ex['norm_clipped'])}, value-clipped {vec(ex['value_clipped'])}, "
                f"{fmt(ex['angle_deg'], 1)} deg apart")
          """),
      md("""
          ## The same descent with the library's usual API

          The experiment is nothing more than an `optax.chain` of the clipper and SGD. Written as
          a training loop, with the clip metrics read from the optimizer state, it lands where the
          experiment's norm-clipping arm does:
          """),
      code("""
          import jax.numpy as jnp
          import numpy as np
          import optax

          tx = optax.chain(clipax.clip_by_global_norm(config.max_norm), optax.sgd(config.lr))
          p = jnp.asarray(config.start, jnp.float32)
          state = tx.init(p)


          @jax.jit
          def step(p, state):
            grad = jax.grad(lambda q: cliff.loss_fn(config, q))(p)
            updates, state = tx.update(grad, state, p)
            return optax.apply_updates(p, updates), state


          norms = []
          for _ in range(config.steps):
            p, state = step(p, state)
            norms.append(clipax.metrics(state)["clip/global_norm/norm"])
          m = clipax.metrics(state)
          print(f"final point {np.round(np.asarray(p), 3)}, experiment "
                f"{np.round(result['arms']['norm']['final_point'], 3)}")
          print(f"clipped {int(m['clip/global_norm/clipped_count'])} "
                f"of {int(m['clip/global_norm/count'])} steps; "
                f"largest pre-clip norm {float(np.max(norms)):.1f}")
          print(clipax.diagnose(state))
          """),
      md("""
          `diagnose` says the threshold is busy: near the wall almost every step is clipped, and
          over a run this short that is a large fraction of it. In a real network the same
          reading means the gradient norm is usually above `max_norm`; see the quickstart's
          section on `clipax.suggest_max_norm`.
          """),
  ]


# ------------------------------------------------------------------------------------- imbalance


def imbalance() -> list[nbformat.NotebookNode]:
  return [
      *header(
          "imbalance",
          "A rare class yanking the weights: what clipping buys, and what it does not",
          """
          A tiny classifier (an embedding table of 4 tokens x 16 and a linear layer to 4 logits)
          is trained with plain SGD and batch size 1. The input token is uniform and carries no
          information about the label; the label is "A" except at a few random positions where it
          is "B". Each B sample is a surprise with a large cross-entropy gradient, and with batch
          size 1 nothing averages it away: without clipping, every rare sample yanks the weights.

          The experiment, `clipax.experiments.imbalance`, trains the same model on the same data
          with and without `clipax.clip_by_global_norm(1.0)`, over several seeds and three
          scenarios (99:1 and 80:20 class ratios, two learning rates). The whole per-sample SGD
          loop is one `jax.lax.scan`, vmapped over seeds and over both arms, so it runs in seconds.
          """,
      ),
      parameters(
          """
          QUICK = False  # @param {type:"boolean"}
          SEEDS = 10  # @param {type:"integer"}
          MAX_NORM = 1.0  # @param {type:"number"}
          """,
          """
          if QUICK:
            SEEDS = min(SEEDS, 2)
          """,
      ),
      environment(),
      md("""
          ## The data

          One seed's training set for the 99:1 scenario: uniform tokens, a handful of B labels.
          Because the token says nothing about the label, the best any model can do is predict
          the class frequencies; class B can never be predicted from the input.
          """),
      code("""
          import dataclasses
          import pathlib

          import numpy as np
          from IPython.display import Image, Markdown, display

          from clipax.experiments import imbalance

          config = imbalance.Config.quick() if QUICK else imbalance.Config()
          config = dataclasses.replace(config, max_norm=MAX_NORM)
          first = config.scenarios[0]
          tokens, labels = imbalance.make_data(config, first.n_rare, seed=0)
          print(f"{first.name}: {len(labels)} samples, {int(labels.sum())} labelled B "
                f"at positions {np.flatnonzero(labels).tolist()}")
          print("token counts:", np.bincount(tokens, minlength=config.n_tokens).tolist())
          for scenario in config.scenarios:
            print(scenario)
          """),
      md("""
          ## Run every scenario, seed and arm
          """),
      code("""
          result = imbalance.run(config, seeds=SEEDS)
          display(Markdown(imbalance.table(result)))
          """),
      code("""
          for path in imbalance.plot(result, pathlib.Path("figures")):
            display(Image(filename=str(path)))
          """),
      md("""
          ## What it shows

          **Clipping buys stability.** The largest change of the weight norm from one step to
          the next is the signature of a single rare sample yanking the weights. With
          `clip_by_global_norm(1.0)` it is several times smaller, in every scenario: each B
          sample's gradient (norm around 7, the `max gradient norm` row) is cut to norm 1 before
          it reaches the weights. In the weight-norm plot the no-clip curve drops sharply at the
          grey lines (the B samples) and climbs back slowly in between; the clipped curve only
          has small notches there. Slower measures of drift (the spread of the weight norm and
          of the embedding's effective dimension over the whole run) are mixed: much smaller with
          clipping in some scenarios, not in others. Compare the rows.

          **Clipping does not buy rare-class learning.** Class-B accuracy is zero with and
          without clipping, and the loss on the rare samples is *higher* with clipping: the model
          is simply no longer dragged towards B by each one. Clipping limits how much one sample
          can move the weights; it does nothing for a class the model cannot learn. For class
          imbalance use reweighting, resampling or a better signal; use clipping to keep outliers
          from wrecking the run.

          The per-seed numbers for the headline metric, so the spread is visible too:
          """),
      code("""
          for name, sc in result["scenarios"].items():
            none = np.array(sc["per_seed"]["none"]["max_weight_change"], np.float64)
            clip = np.array(sc["per_seed"]["clip"]["max_weight_change"], np.float64)
            print(f"{name:16s} no clip {np.round(none, 3).tolist()}")
            print(f"{'':16s} clip    {np.round(clip, 3).tolist()}")
            print(f"{'':16s} clipping smaller on {int(np.sum(clip < none))} of {len(none)} seeds")
          """),
  ]


# -------------------------------------------------------------------------------------- spiky LM


def adaptive_spiky_lm() -> list[nbformat.NotebookNode]:
  return [
      *header(
          "adaptive_spiky_lm",
          "Adaptive clipping and guards on a language model hit by bad batches",
          """
          Large language-model runs are punctuated by loss spikes, and a common cause is a bad
          batch: corrupted or degenerate data whose gradient is hundreds of times the usual size.
          This notebook trains a small decoder-only transformer (Flax NNX, AdamW) on a synthetic
          corpus and injects such a batch at regular intervals, once per arm:

          * **none**: plain AdamW;
          * **`clip_by_global_norm(1.0)`**: a fixed threshold;
          * **`zclip()`**: ZClip (Kumar et al., 2025) learns the mean and spread of the gradient
            norm with EMAs and clips norms whose z-score is too high;
          * **`autoclip()`**: AutoClip (Seetharaman et al., 2020) clips to the 10th percentile of
            the recent norms;
          * **`skip_spikes(adamw)`**: a guard that skips the whole step when the norm is more
            than 6 standard deviations above the recent accepted norms;
          * **`clip_update_rms(adamw)`**: update clipping, StableAdamW's rule (Wortsman et al.,
            2023): each tensor's AdamW update is scaled down when the RMS of `g^2 / v_hat`,
            read from AdamW's own second moment, is above 1.

          The corpus is a seeded Markov source, so the best achievable loss (its entropy rate, the
          *floor*) is known exactly. The experiment is `clipax.experiments.spiky_lm`; each
          clipped or guarded arm reports its clip and skip rates through `clipax.metrics` and
          gets a `clipax.diagnose` verdict.
          """,
      ),
      parameters(
          """
          QUICK = False  # @param {type:"boolean"}
          STEPS = 1000  # @param {type:"integer"}
          SEEDS = 1  # @param {type:"integer"}
          D_MODEL = 128  # @param {type:"integer"}
          N_LAYERS = 4  # @param {type:"integer"}
          BAD_EVERY = 250  # @param {type:"integer"}
          BAD_SCALE = 1000.0  # @param {type:"number"}
          MAX_NORM = 1.0  # @param {type:"number"}
          """,
          """
          if QUICK:  # the experiment's own small configuration, cut to one bad batch (below)
            SEEDS = 1
          """,
      ),
      environment(),
      md("""
          ## The model and the corpus
          """),
      code("""
          import dataclasses
          import pathlib

          import numpy as np
          from IPython.display import Image, Markdown, display

          from clipax.experiments import spiky_lm

          if QUICK:
            config = spiky_lm.Config.quick()
            config = dataclasses.replace(config, steps=min(config.steps, config.bad_every + 40))
          else:
            config = spiky_lm.Config(
                steps=STEPS, d_model=D_MODEL, n_layers=N_LAYERS, bad_every=BAD_EVERY,
                bad_scale=BAD_SCALE, max_norm=MAX_NORM,
            )
          _, _, floor = spiky_lm.markov_source(config, seed=0)
          n_params = spiky_lm.count_params(spiky_lm.make_model(config, seed=0))
          print(config)
          print(f"{n_params:,} parameters; loss floor (entropy rate) {floor:.3f} nats, "
                f"uniform guessing {np.log(config.vocab):.3f} nats")
          print("arms:", spiky_lm.available_arms())
          """),
      md("""
          ## Train every arm

          Every arm sees exactly the same batches from the same initialisation; only the
          clipper (or guard) in front of AdamW differs. On a CPU the default size takes a while;
          tick `QUICK` for a tiny version, or use a GPU/TPU runtime.
          """),
      code("""
          result = spiky_lm.run(config, seeds=SEEDS)
          display(Markdown(spiky_lm.table(result)))
          """),
      code("""
          for path in spiky_lm.plot(result, pathlib.Path("figures")):
            display(Image(filename=str(path)))
          """),
      md("""
          ## The cost of each bad batch

          The loss over the 20 steps after each bad batch minus the loss over the 20 steps
          before it (good batches only): how much of the training progress one bad batch undid.
          """),
      code("""
          def mean_loss(loss, steps):
            values = [loss[t] for t in steps if 0 <= t < len(loss) and t not in bad]
            values = [v for v in values if v is not None]
            return float(np.mean(values)) if values else float("nan")


          bad = set(result["bad_steps"])
          print("bad batches at steps", sorted(bad))
          for arm, r in result["results"].items():
            costs = [
                mean_loss(r["loss"], range(t + 1, t + 21)) - mean_loss(r["loss"], range(t - 20, t))
                for t in sorted(bad)
            ]
            skipped = sorted(bad & set(r["skipped"]))
            clipped = sorted(bad & set(r["clipped"]))
            print(f"{arm:20s} loss cost per bad batch {np.round(costs, 3).tolist()}  "
                  f"clipped {clipped}  skipped {skipped}")
          """),
      md("""
          ## What it shows

          * **No clipping.** A bad batch's gradient goes straight into AdamW. Adam divides by the
            root of its second-moment estimate, so the step does not grow with the gradient, but
            it points wherever the garbage batch says, the first moment keeps pushing that way
            for the next few steps, and the inflated second moment shrinks the good updates that
            follow for a long time: the loss jumps and recovers slowly.
          * **`clip_by_global_norm`.** The bad gradient is cut to norm `MAX_NORM`, the size of an
            ordinary step: the bad batch becomes one slightly wrong step among many and costs
            next to nothing. Ordinary steps are below the threshold and pass through untouched,
            which is what `diagnose` calls healthy.
          * **`zclip`.** The same protection without choosing a threshold: the clip level is
            learned from the norms themselves, and the spike is clipped back into the normal
            band. During its warm-up (the first 25 steps) it clips at a fixed `max_norm`, which
            also stays in force afterwards as an absolute cap (1.0 by default).
          * **`autoclip`.** Clipping to the 10th percentile of the last 1,000 norms clips a
            large share of all steps (its clip rate in the table), the spike among them. For a
            percentile rule that is by design, and `diagnose` says so: it reports the rate and
            calls it `clipping_often` only above its `clip_rate_high`. The percentile sets how
            much of every step is cut, which is why it is a hyperparameter worth tuning.
          * **`skip_spikes`.** Skipping is stronger than clipping: the bad batch does not move the
            weights or the optimizer's moments at all. But the guard must first learn what normal
            looks like: it needs `warmup` accepted norms (16 by default) before it can call
            anything a spike, and a bad batch that comes earlier goes through as if unguarded.
            The strip under the plot shows which steps it skipped.
          * **`clip_update_rms`.** Update clipping acts on what AdamW is about to apply, not on
            the gradient. It clips the bad step itself (its `g^2` dwarfs the old `v_hat`), but
            that step's update was already bounded by Adam's normalisation; what follows is not
            clipped: the bad gradient sits in the first moment and keeps pushing for the next
            steps, while the inflated second moment makes every later ratio small. In the demo's
            runs the loss spikes after the bad batches stayed (the table's spike count). The rule
            targets a different failure: a second moment that is *too small* for a sudden large
            gradient (the early clipped steps in the strip), the loss spikes of Wortsman et al.

          Guards and clippers compose. A guard for the rare catastrophic batch, with an adaptive
          clipper for the ordinary outliers, is one line, and `clipax.metrics` reports both
          (`clip/skip_spikes/...` for the guard, `clip/zclip/...` for the clipper):

          ```python
          tx = clipax.skip_spikes(optax.chain(clipax.zclip(), optax.adamw(3e-3)))
          optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
          ```
          """),
  ]


NOTEBOOKS = {
    "quickstart": quickstart,
    "cliff": cliff,
    "imbalance": imbalance,
    "adaptive_spiky_lm": adaptive_spiky_lm,
}


def build(name: str) -> nbformat.NotebookNode:
  """The notebook ``name`` as an ``nbformat`` v4 notebook without outputs."""
  nb = nbformat.v4.new_notebook()
  nb.cells = NOTEBOOKS[name]()
  nb.metadata = {
      "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  for i, cell in enumerate(nb.cells):
    cell["id"] = f"{name[:20]}-{i:02d}"
  nbformat.validate(nb)
  return nb


def main(argv: list[str]) -> None:
  names = argv or list(NOTEBOOKS)
  for name in names:
    path = HERE / f"{name}.ipynb"
    nbformat.write(build(name), path)
    print(f"wrote {path.relative_to(HERE.parent)}")


if __name__ == "__main__":
  main(sys.argv[1:])
