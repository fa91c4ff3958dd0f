"""The jitted train / eval steps: one compilation, donated state, a loss that falls, build-nanogpt's lr."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flax_gpt import ops, remat
from flax_gpt.config import preset
from flax_gpt.model import GPT
from flax_gpt.optim import OptimConfig, lr_at, lr_schedule, make_optimizer
from flax_gpt.train_step import init_state, loss_fn, make_eval_step, make_train_step, micro_keys

A, B, T = 1, 2, 16  # micro batches per step, sequences, tokens
OPTIM = OptimConfig(lr=3e-3, warmup_steps=3, max_steps=10)


def batch(seed: int, accum: int = A):
    """(x, y) int32 (accum, B, T) random token ids."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 50257, size=(accum, B, T + 1), dtype=np.int32)
    return jnp.asarray(tokens[..., :-1]), jnp.asarray(tokens[..., 1:])


@pytest.fixture(scope="module")
def setup():
    """(tx, train_step, eval_step) of the tiny preset model, shared: each is compiled once for the module."""
    tx = make_optimizer(OPTIM)
    graphdef, _ = init_state(GPT(preset("tiny"), seed=0), tx)
    return tx, make_train_step(graphdef, tx, lr_schedule(OPTIM)), make_eval_step(graphdef)


def fresh_state(tx):
    return init_state(GPT(preset("tiny"), seed=0), tx)[1]


def test_train_step_compiles_once_and_reports_loss_grad_norm_lr(setup):
    tx, step, _ = setup
    state = fresh_state(tx)
    for i in range(4):
        x, y = batch(100 + i)  # a different batch every step
        state, metrics = step(state, x, y)
        assert set(metrics) == {"loss", "grad_norm", "lr"}
        lr = float(metrics["lr"])
        assert lr == pytest.approx(lr_at(i, OPTIM), rel=1e-6), (i, lr, lr_at(i, OPTIM))
        assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == 4
    assert step._cache_size() == 1  # four batches, one compilation


def test_lr_follows_the_schedule_and_loss_falls_on_one_batch(setup):
    tx, step, _ = setup
    state = fresh_state(tx)
    x, y = batch(7)
    lrs, losses = [], []
    for _ in range(OPTIM.max_steps + 2):  # warmup, cosine, then min_lr beyond max_steps
        state, metrics = step(state, x, y)  # the same batch: the model overfits it
        lrs.append(float(metrics["lr"]))
        losses.append(float(metrics["loss"]))
    np.testing.assert_allclose(lrs, [lr_at(i, OPTIM) for i in range(len(lrs))], rtol=1e-6)
    assert lrs[OPTIM.warmup_steps - 1] == pytest.approx(OPTIM.lr, rel=1e-6)
    assert lrs[-1] == pytest.approx(OPTIM.lr * OPTIM.min_lr_ratio, rel=1e-6)
    # measured (CPU, fp32): 10.857 10.723 10.538 10.359 10.217 10.086 9.966 9.870 9.801 9.758 9.734 9.717
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[9] < losses[0] - 0.8, losses
    assert step._cache_size() == 1


def test_state_is_donated(setup):
    tx, step, _ = setup
    state = fresh_state(tx)
    old_param = jax.tree.leaves(state.params)[0]
    old_moment = [leaf for leaf in jax.tree.leaves(state.opt_state) if leaf.ndim >= 2][0]
    new_state, _ = step(state, *batch(1))
    assert old_param.is_deleted() and old_moment.is_deleted()  # buffers reused for the new state
    assert not jax.tree.leaves(new_state.params)[0].is_deleted()
    assert step._cache_size() == 1


def test_without_donation_the_state_is_kept_and_the_steps_are_the_same(setup):
    """The fallback for platforms that cannot donate (jax-mps), forced on the CPU: bit for bit the donating step."""
    tx, step, _ = setup
    graphdef, _ = init_state(GPT(preset("tiny"), seed=0), tx)
    copying = make_train_step(graphdef, tx, lr_schedule(OPTIM), donate=False)
    kept, donated = fresh_state(tx), fresh_state(tx)
    for i in range(3):
        before = jax.tree.leaves(kept.params)[0]
        kept, kept_metrics = copying(kept, *batch(i))
        donated, metrics = step(donated, *batch(i))
        assert not before.is_deleted()
        assert float(kept_metrics["loss"]) == float(metrics["loss"])
    for a, b in zip(jax.tree.leaves(kept), jax.tree.leaves(donated)):
        np.testing.assert_array_equal(a, b)


def test_eval_step_compiles_once(setup):
    tx, _, eval_step = setup
    params = fresh_state(tx).params
    losses = []
    for i in range(4):
        x, y = batch(300 + i)
        losses.append(float(eval_step(params, x[0], y[0])))
    assert eval_step._cache_size() == 1
    assert len(set(losses)) == 4  # different batches, different losses, one executable
    # a random init scores about ln(vocab): every loss within 0.2 of ln(50257) = 10.825
    assert all(abs(v - np.log(50257)) < 0.2 for v in losses), losses
    assert not jax.tree.leaves(params)[0].is_deleted()  # eval never donates the parameters


@pytest.mark.parametrize("accum", (1, 2))
def test_remat_steps_equal_plain_steps(accum):
    """--remat's hand-written backward pass (flax_gpt.remat) inside the real step, with accumulation: same losses,
    gradient norms and parameters as autodiff without remat, fp32."""
    tx = make_optimizer(OPTIM)
    runs = {}
    for with_remat in (False, True):
        graphdef, state = init_state(GPT(preset("tiny", remat=with_remat), seed=0), tx)
        step = make_train_step(graphdef, tx, lr_schedule(OPTIM))
        metrics = []
        for i in range(3):
            state, m = step(state, *batch(200 + i, accum))
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
        runs[with_remat] = metrics, state.params
    np.testing.assert_allclose(runs[True][0], runs[False][0], rtol=1e-5)  # measured <= 3e-7
    # The keys' bias gets a gradient that is zero in exact arithmetic (a shift of every key moves no softmax), so
    # AdamW turns rounding noise into lr-sized steps: compared are its query and value thirds.
    C = preset("tiny").n_embd

    def compared(params):  # leaves, the keys' third of c_attn's bias left out
        return [x[:, np.r_[:C, 2 * C:3 * C]] if "c_attn']['bias" in jax.tree_util.keystr(path) else x
                for path, x in jax.tree_util.tree_leaves_with_path(params)]

    worst = max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                for a, b in zip(compared(runs[True][1]), compared(runs[False][1])))
    assert worst <= 1e-5, worst  # measured 2.0e-7 and 3.1e-7 (1.5e-4 with the keys' bias)


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_remat_walks_the_model_as_gpt_trunk_does(dtype):
    """flax_gpt.remat's forward walk against GPT.trunk of the same --remat model (both a rolled loop of the same
    blocks): bit for bit the same ln_f output, the embeddings as the first block's input, one input per block."""
    config = preset("tiny", remat=True, dtype=dtype)
    graphdef, params = nnx.split(GPT(config, seed=0), nnx.Param)
    x = batch(5)[0][0]  # (B, T)

    def walks(params):
        model = nnx.merge(graphdef, params)
        h, _, inputs, _ = remat.trunk(model, x)  # (B, T, C), ln_f's vjp, (L, B, T, C), no dropout keys
        return h, inputs, model.trunk(x)[0], model.embed(x)

    h, inputs, trunk_h, embedded = jax.jit(walks)(params)
    assert inputs.shape == (config.n_layer, *embedded.shape)
    np.testing.assert_array_equal(h, trunk_h)  # measured 0; 4.8e-7 against the unrolled loop of a model without remat
    np.testing.assert_array_equal(inputs[0], embedded)


@pytest.mark.parametrize("loss_chunks", (False, True))
def test_remat_loss_and_gradients_equal_autodiff_of_gpt_loss(monkeypatch, loss_chunks):
    """remat.loss_and_grads against jax.value_and_grad of GPT.loss without remat, fp32, directly (no optimizer
    step between). loss_chunks: blocks of 8 queries and chunks of 16 tokens, so a (2, 16) batch runs several of each
    and wte's lm_head gradient is formed after the blocks' backward pass."""
    if loss_chunks:
        for name, value in (("ATTENTION_BLOCK", 8), ("LOSS_CHUNK", 16), ("FULL_LOGITS_TOKENS", 16)):
            monkeypatch.setattr(ops, name, value)
    graphdef, params = nnx.split(GPT(preset("tiny", remat=True), seed=0), nnx.Param)
    plain_graphdef = nnx.split(GPT(preset("tiny"), seed=0), nnx.Param)[0]
    x, y = (a[0] for a in batch(9))  # (B, T) each
    loss, grads = jax.jit(remat.loss_and_grads, static_argnums=1)(params, graphdef, x, y)
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(params, plain_graphdef, x, y)
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * float(ref_loss)
    leaves, ref_leaves = jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves_with_path(ref_grads)
    assert [p for p, _ in leaves] == [p for p, _ in ref_leaves]  # every parameter, in the same structure
    worst = max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for (_, a), (_, b) in zip(leaves, ref_leaves))
    assert worst <= 5e-6, worst  # measured 1.9e-7 (full logits) and 2.2e-7 (in chunks); loss 0 apart


def test_dropout_draws_fresh_masks_per_step_and_micro_batch_and_remat_redraws_the_same():
    """With --dropout the train state's key gives each step and each micro batch masks of its own (from the step
    count: a resumed state draws the same), and the remat step recomputes exactly the masks it dropped with."""
    config = preset("tiny", dropout=0.2)
    model = GPT(config, seed=0)
    tx = make_optimizer(OPTIM)
    graphdef, state = init_state(model, tx, seed=3)
    assert state.dropout_key is not None and init_state(GPT(preset("tiny"), seed=0), tx)[1].dropout_key is None
    x, y = batch(4, accum=2)
    x = jnp.stack([x[0], x[0]])  # two micro batches of the same tokens
    y = jnp.stack([y[0], y[0]])
    losses = jax.jit(jax.vmap(lambda k, x, y: loss_fn(state.params, graphdef, x, y, k)))
    keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(state.dropout_key, s), 0))(jnp.arange(3))
    per_step = losses(keys, jnp.stack([x[0]] * 3), jnp.stack([y[0]] * 3))
    assert len(set(np.asarray(per_step).tolist())) == 3  # step 0, 1, 2: three different masks
    micro = micro_keys(state, 2)
    per_micro = losses(micro, x, y)
    assert float(per_micro[0]) != float(per_micro[1])  # the same tokens, different masks
    assert float(per_micro[0]) == float(per_step[0])  # micro batch 0 of step 0

    remat_graphdef = nnx.split(GPT(config.replace(remat=True), seed=0), nnx.Param)[0]
    loss, grads = jax.jit(remat.loss_and_grads, static_argnums=1)(state.params, remat_graphdef, x[0], y[0], micro[0])
    ref_loss, ref_grads = jax.jit(jax.value_and_grad(loss_fn), static_argnums=1)(state.params, graphdef, x[0], y[0],
                                                                                  micro[0])
    assert abs(float(loss) - float(ref_loss)) <= 1e-6 * float(ref_loss)  # measured 0
    worst = max(float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
                for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)))
    print(f"remat with dropout vs autodiff: loss {abs(float(loss) - float(ref_loss)):.1e}, gradients {worst:.1e}")
    assert worst <= 5e-6, worst  # measured 1.5e-7 (no dropout: 1.9e-7)


def test_loss_scale_follows_grad_scaler_and_a_collapsed_scale_stops_in_one_line():
    """torch.amp.GradScaler's update: x0.5 and the tracker reset on inf/NaN, x2 after growth_interval good steps."""
    from flax_gpt import loss_scale
    from flax_gpt.errors import UserError
    from flax_gpt.train import check_loss_scale

    s = loss_scale.update(loss_scale.initial(), jnp.bool_(False), growth_interval=3)
    assert (float(s.scale), int(s.good_steps), int(s.skipped)) == (32768.0, 0, 1)
    for good in (1, 2):
        s = loss_scale.update(s, jnp.bool_(True), growth_interval=3)
        assert (float(s.scale), int(s.good_steps)) == (32768.0, good)
    s = loss_scale.update(s, jnp.bool_(True), growth_interval=3)
    assert (float(s.scale), int(s.good_steps), int(s.skipped)) == (65536.0, 0, 1)
    check_loss_scale(loss_scale.MIN_SCALE, 5, 40)  # at the floor: the run goes on
    with pytest.raises(UserError, match=r"^the float16 loss scale fell to 3.0e-08 at step 5 \(41 steps skipped .* "
                                         r"--dtype bf16 or fp32"):
        check_loss_scale(loss_scale.MIN_SCALE / 2, 5, 41)
