"""The settings of pytorch/examples' word_language_model recipe: end-of-line tokens, initialisation, embedding
dropout, tied weights and the plateau schedule; each from the spec to the trainer and through a checkpoint."""

from __future__ import annotations

import argparse
import io
import math
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from gradserve import cli
from gradserve import spec as specs
from gradserve.text import EOS, text_tokens
from gradserve.v1 import jobs_pb2
from torch.nn.modules.module import register_module_forward_pre_hook

from gradserve_worker.errors import CannotTrain
from gradserve_worker.generate import join_tokens
from gradserve_worker.models import TorchRNN, build_model
from gradserve_worker.optim import Plateau
from gradserve_worker.trainer import CheckpointReady, Evaluation, StepMetrics, TrainConfig, load_checkpoint, train


def small(**overrides) -> TrainConfig:
    base = {"model": "lstm", "hidden_size": 16, "batch_size": 4, "num_steps": 8, "preprocess": "d2l", "max_steps": 10,
            "log_every": 1, "checkpoint_every": 1000, "device": "cpu", "val_fraction": 0.0, "probe_every": 10**6}
    return TrainConfig(**{**base, **overrides})


def events_of(config: TrainConfig, text: str, **kwargs) -> list:
    events = []
    train(config, text, events.append, **kwargs)
    return events


# -----------------------------------------------------------------------------
# end-of-line tokens


def test_eos_ends_every_line_of_a_word_text_with_a_token():
    text = "The cat.\nsat\n\non it\n"
    assert text_tokens(text, "word", "none") == ["The", "cat.", "sat", "on", "it"]
    assert text_tokens(text, "word", "none", eos=True) == ["The", "cat.", EOS, "sat", EOS, EOS, "on", "it", EOS]
    # d2l preprocessing runs line by line, so a run of non-letters never swallows a line end.
    assert text_tokens(text, "word", "d2l", eos=True) == ["the", "cat", EOS, "sat", EOS, EOS, "on", "it", EOS]


def test_eos_keeps_line_ends_of_a_char_text_under_d2l_preprocessing():
    text = "Ab.\ncd"
    assert text_tokens(text, "char", "d2l") == list("ab cd")
    assert text_tokens(text, "char", "d2l", eos=True) == list("ab \ncd")
    assert text_tokens(text, "char", "none", eos=True) == text_tokens(text, "char", "none") == list(text)


def test_an_eos_job_trains_on_the_eos_token_and_generates_line_breaks(timemachine):
    config = small(tokenization="word", eos=True, preprocess="none", max_steps=2)
    [ckpt] = [e for e in events_of(config, timemachine[:3000])
              if isinstance(e, CheckpointReady) and e.latest]
    _, vocab, _, _ = load_checkpoint(ckpt.data)
    assert EOS in vocab
    assert join_tokens("the end", ["of", EOS, "it", EOS], "word") == "the end of\nit\n"


# -----------------------------------------------------------------------------
# initialisation


def test_uniform_init_draws_embedding_and_output_weights_in_its_range_and_zeroes_the_output_bias():
    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=500, hidden_size=64, num_layers=2, embedding_size=32, init="uniform",
                        init_range=0.1)
    for w in (model.embedding.weight, model.linear.weight):
        assert w.abs().max() <= 0.1
        # U(-r, r) has standard deviation r/√3 and mean 0; with 16,000+ draws both show within a few percent.
        assert w.std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.03)
        assert abs(w.mean().item()) < 0.002
    assert torch.count_nonzero(model.linear.bias) == 0
    # The recurrent layers keep torch's U(-1/√H, 1/√H).
    assert model.rnn.weight_hh_l0.abs().max() <= 1 / math.sqrt(64)
    assert model.rnn.weight_hh_l0.abs().max() > 0.1


def test_default_init_is_torchs_and_draws_nothing_more():
    torch.manual_seed(3)
    a = build_model("gru", vocab_size=20, hidden_size=8, num_layers=1, embedding_size=4)
    after_a = torch.rand(1)
    torch.manual_seed(3)
    b = build_model("gru", vocab_size=20, hidden_size=8, num_layers=1, embedding_size=4, init="default")
    assert torch.equal(torch.rand(1), after_a)
    assert torch.equal(a.embedding.weight, b.embedding.weight)
    assert a.embedding.weight.std() > 0.5  # N(0, 1), not the uniform ±0.1


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_chrono_init_spreads_the_memory_gates_bias_over_log_1_to_log_max_dependency(kind):
    torch.manual_seed(0)
    H, T_max = 256, 50
    model = build_model(kind, vocab_size=10, hidden_size=H, num_layers=2, init="chrono", max_dependency=T_max)
    for layer in range(2):
        _, _, b_ih, b_hh = model.layer_weights(layer)
        # LSTM gates i, f, g, o: the forget gate keeps; GRU gates r, z, n: z keeps h_{t-1}.
        keep = b_ih[H : 2 * H]
        assert keep.min() >= 0 and keep.max() <= math.log(T_max - 1)
        # log(u) for u ~ U[1, T_max - 1]: the median is log((1 + T_max - 1) / 2).
        assert keep.median().item() == pytest.approx(math.log(T_max / 2), abs=0.25)
        assert torch.count_nonzero(b_hh[H : 2 * H]) == 0
        if kind == "lstm":
            assert torch.equal(b_ih[:H], -keep) and torch.count_nonzero(b_hh[:H]) == 0
        # The other gates keep torch's draws.
        assert torch.count_nonzero(b_ih[2 * H :]) == b_ih[2 * H :].numel()


def test_chrono_init_is_refused_for_a_model_without_gates():
    with pytest.raises(CannotTrain, match="invalid training config: init chrono sets the gate biases of gru and lstm"):
        train(small(model="rnn", init="chrono"), "", lambda e: None)


def test_max_dependency_defaults_to_num_steps():
    spec = specs.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs", num_steps=70))
    assert spec.max_dependency == 70
    assert specs.resolved(small(num_steps=12), "max_dependency") == 12
    assert specs.resolved(small(num_steps=1), "max_dependency") == 2


# -----------------------------------------------------------------------------
# embedding dropout


def test_embedding_dropout_drops_the_embeddings_output_in_training_only():
    torch.manual_seed(0)
    model = build_model("lstm", vocab_size=50, hidden_size=8, num_layers=1, embedding_size=64, embedding_dropout=0.4)
    X = torch.randint(0, 50, (20, 10))
    dropped = model.inputs(X)
    assert (dropped == 0).float().mean().item() == pytest.approx(0.4, abs=0.03)
    kept = dropped != 0
    assert torch.allclose(dropped[kept], model.embedding(X)[kept] / 0.6)
    model.eval()
    assert torch.equal(model.inputs(X), model.embedding(X))


def test_embedding_dropout_needs_an_embedding():
    assert ("embedding_dropout", "drops the learned embedding's output, and embedding_size is 0 (one-hot input); "
            "set embedding_size, or leave embedding_dropout 0, got 0.2") in specs.violations(small(embedding_dropout=0.2))


# -----------------------------------------------------------------------------
# tied weights


@pytest.mark.parametrize("model", ["lstm", "rnn_scratch"])
def test_tied_weights_are_one_tensor_through_training_and_a_checkpoint(timemachine, model):
    config = small(model=model, embedding_size=16, tie_weights=True, max_steps=3)
    events = events_of(config, timemachine[:3000])
    [ckpt] = [e for e in events if isinstance(e, CheckpointReady) and e.latest]
    net, vocab, _, _ = load_checkpoint(ckpt.data)
    weight, _ = net.output_weights()
    assert weight.data_ptr() == net.embedding.weight.data_ptr()
    assert weight.shape == (len(vocab), 16)
    # The gradient norms name the shared matrix once: the optimizer updated one tensor.
    [first, *_] = [e for e in events if isinstance(e, StepMetrics)]
    names = set(first.param_grad_norms)
    assert "embedding.weight" in names and not names & {"linear.weight", "W_hq"}
    assert sum(p.numel() for p in net.parameters()) == specs.parameter_count(config, len(vocab))


def test_parameter_count_leaves_out_the_tied_output_matrix():
    config = small(embedding_size=16)
    untied = build_model("lstm", vocab_size=30, hidden_size=16, num_layers=1, embedding_size=16)
    tied = build_model("lstm", vocab_size=30, hidden_size=16, num_layers=1, embedding_size=16, tie_weights=True)
    assert sum(p.numel() for p in untied.parameters()) == specs.parameter_count(config, 30)
    assert sum(p.numel() for p in tied.parameters()) == specs.parameter_count(small(embedding_size=16, tie_weights=True),
                                                                                30) == specs.parameter_count(config, 30) - 16 * 30


def test_tied_weights_need_the_embedding_as_wide_as_the_hidden_state():
    assert ("tie_weights", "needs embedding_size equal to hidden_size, got embedding_size 8 and hidden_size 16") \
        in specs.violations(small(embedding_size=8, tie_weights=True))
    assert ("tie_weights", "needs a vocabulary, and builtin:adding reads real-valued features") \
        in specs.violations(small(dataset="builtin:adding", tie_weights=True))
    with pytest.raises(CannotTrain, match="tie_weights needs embedding_size equal to hidden_size"):
        TorchRNN("gru", vocab_size=10, hidden_size=16, num_layers=1, embedding_size=8, tie_weights=True)


def test_uniform_init_draws_a_tied_matrix_once():
    torch.manual_seed(1)
    model = build_model("lstm", vocab_size=40, hidden_size=8, num_layers=1, embedding_size=8, tie_weights=True,
                        init="uniform", init_range=0.05)
    after = torch.rand(1)
    torch.manual_seed(1)
    build_model("lstm", vocab_size=40, hidden_size=8, num_layers=1, embedding_size=8, tie_weights=True)
    torch.empty(40, 8).uniform_(-0.05, 0.05)
    assert torch.equal(torch.rand(1), after)
    assert model.linear.weight.abs().max() <= 0.05 and torch.count_nonzero(model.linear.bias) == 0


# -----------------------------------------------------------------------------
# the plateau schedule


def test_plateau_cuts_lr_after_each_evaluation_that_does_not_improve_down_to_its_floor():
    plateau = Plateau(lr=20.0, gamma=0.25, floor=1.0)
    cuts = [plateau.observe(loss) for loss in (5.0, 4.0, 4.0, 3.9, 4.5, 4.2, 3.0, 3.5)]
    assert cuts == [False, False, True, False, True, True, False, True]
    assert plateau.lr == 1.0 and plateau.best == 3.0  # 20 → 5 → 1.25 → floor 1 (not 0.3125) → 1


def test_plateau_cuts_lr_exactly_at_the_evaluations_where_the_held_out_loss_stalls(timemachine):
    config = small(lr=5.0, lr_gamma=0.5, schedule="plateau", val_fraction=0.1, eval_every=1, max_steps=12)
    events = events_of(config, timemachine[:3000])
    losses = {e.step: e.loss for e in events if isinstance(e, Evaluation)}
    lrs = {e.step: e.lr for e in events if isinstance(e, StepMetrics)}
    expected, best, lr = {}, math.inf, 5.0
    for step in range(1, 13):
        expected[step] = lr
        if losses[step] < best:
            best = losses[step]
        else:
            lr *= 0.5
    assert lrs == expected
    stalls = sum(expected[s + 1] < expected[s] for s in range(1, 12))
    assert 0 < stalls < 11  # the run has both kinds of evaluation, so the test tells them apart


def test_plateau_state_continues_bit_for_bit_after_a_resume(timemachine):
    config = small(lr=5.0, lr_gamma=0.5, min_lr=1.0, schedule="plateau", val_fraction=0.1, eval_every=1, max_steps=12)
    text = timemachine[:3000]
    straight = events_of(config, text)
    first = events_of(small(**{**asdict(config), "max_steps": 9, "checkpoint_every": 9}), text)
    [half] = [e for e in first if isinstance(e, CheckpointReady) and e.latest]
    saved = torch.load(io.BytesIO(half.data), weights_only=True)["plateau"]
    assert saved["lr"] < 5.0  # cuts happened before the checkpoint, so their state has to come back
    rest = events_of(config, text, resume=half.data)

    def reports(events):
        return [(e.step, e.loss, e.lr) if isinstance(e, StepMetrics) else (e.step, e.loss)
                for e in events if isinstance(e, (StepMetrics, Evaluation))]

    assert reports(first) + reports(rest) == reports(straight)
    assert min(e.lr for e in straight if isinstance(e, StepMetrics)) == 1.0


def test_plateau_needs_held_out_text():
    assert ("schedule", "plateau decays lr after evaluations, and val_fraction 0 holds nothing out to evaluate; "
                        "set val_fraction above 0, or use another schedule") in specs.violations(
        small(dataset="builtin:pydocs", schedule="plateau"))
    assert not specs.violations(small(dataset="builtin:copy", schedule="plateau"))


# -----------------------------------------------------------------------------
# checkpoints written before these settings existed


def test_a_checkpoint_without_the_recipe_settings_resumes_with_their_defaults(timemachine):
    text = timemachine[:3000]
    [ckpt] = [e for e in events_of(small(max_steps=2), text) if isinstance(e, CheckpointReady) and e.latest]
    payload = torch.load(io.BytesIO(ckpt.data), weights_only=True)
    new = ("eos", "init", "init_range", "max_dependency", "embedding_dropout", "tie_weights", "min_lr")
    payload["config"] = {k: v for k, v in payload["config"].items() if k not in new}
    del payload["plateau"]
    buf = io.BytesIO()
    torch.save(payload, buf)
    old = buf.getvalue()
    assert load_checkpoint(old).config == small(max_steps=2)
    resumed = events_of(small(max_steps=3), text, resume=old)
    assert [e.step for e in resumed if isinstance(e, StepMetrics)] == [3]
    with pytest.raises(CannotTrain, match="trained with init='default' but this job has init='uniform'"):
        train(small(max_steps=3, init="uniform"), text, lambda e: None, resume=old)


# -----------------------------------------------------------------------------
# the README's recipe


def readme_recipe() -> list[str]:
    """The `gradserve submit` flags of the README's "Bring your pytorch/examples recipe" section."""
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    section = readme.split("### Bring your pytorch/examples recipe", 1)[1]
    block = section.split("```sh\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")
    [command] = [line for line in block.splitlines() if line.startswith("gradserve submit ")]
    return shlex.split(command)[2:]


def test_the_readme_recipe_trains_with_the_peers_initial_weights(timemachine):
    commands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    args = commands.choices["submit"].parse_args([*readme_recipe(), "--tie-weights"])
    spec = specs.complete(jobs_pb2.JobSpec(dataset="builtin:pydocs", **{f.name: getattr(args, f.name)
                                                                        for f in specs.FIELDS}))
    recipe = TrainConfig.from_spec(spec)
    assert (recipe.model, recipe.num_layers, recipe.hidden_size, recipe.embedding_size) == ("lstm", 2, 200, 200)
    assert (recipe.optimizer, recipe.lr, recipe.clip_norm, recipe.batch_size, recipe.num_steps) == ("sgd", 20, 0.25,
                                                                                                    20, 35)
    assert (recipe.dropout, recipe.embedding_dropout, recipe.init, recipe.init_range) == (0.2, 0.2, "uniform", 0.1)
    assert (recipe.eos, recipe.tokenization, recipe.schedule, recipe.lr_gamma) == (True, "word", "plateau", 0.25)
    # A few steps on a small text, on this machine's CPU.
    config = TrainConfig(**{**asdict(recipe), "dataset": "", "max_steps": 3, "device": "cpu", "val_fraction": 0.05})
    initial = {}

    def first_forward(module, args):
        if isinstance(module, TorchRNN) and not initial:
            initial.update({name: p.detach().clone() for name, p in module.named_parameters()})
            initial["tied"] = module.linear.weight is module.embedding.weight

    handle = register_module_forward_pre_hook(first_forward)
    try:
        events = events_of(config, timemachine[:40_000])  # a vocabulary of ~1,400 words keeps the steps quick
    finally:
        handle.remove()

    assert initial["tied"] and "linear.weight" not in initial  # one Parameter, listed once
    embedding = initial["embedding.weight"]
    assert embedding.abs().max() <= 0.1 and embedding.std().item() == pytest.approx(0.1 / math.sqrt(3), rel=0.03)
    assert torch.count_nonzero(initial["linear.bias"]) == 0
    for layer in range(2):
        w = initial[f"rnn.weight_hh_l{layer}"]
        assert w.abs().max() <= 1 / math.sqrt(200)
        assert w.std().item() == pytest.approx(1 / math.sqrt(200) / math.sqrt(3), rel=0.03)
    metrics = [e for e in events if isinstance(e, StepMetrics)]
    assert [m.step for m in metrics] == [3] and math.isfinite(metrics[0].loss)
    [ckpt] = [e for e in events if isinstance(e, CheckpointReady) and e.latest]
    model, vocab, _, _ = load_checkpoint(ckpt.data)
    assert EOS in vocab and model.linear.weight.data_ptr() == model.embedding.weight.data_ptr()
