"""Text from a job's latest checkpoint: what the `gradserve.generate` task runs.

A generate worker serves these requests on a queue of its own:

    gradserve-worker --redis-url redis://localhost:6379/0 --queues generate

It runs Celery's solo pool, one process with no fork, so torch is safe in it
and a loaded model stays loaded between requests (`ModelCache`). Training
workers never take these tasks: their prefork parent must not run torch ops
(its thread pool would not survive the fork of the next job), and a request
must not wait behind a training job.

The server sends the task by name with a request id and waits on the Redis list
`store.reply_key(request_id)`; `Generator.serve` always pushes exactly one
reply there, the text or an error with the gRPC status it maps to.

`generate_text` is plain torch and can be called on any loaded checkpoint:

    text = generate_text(load_checkpoint(data), "time traveller", 50, temperature=0.0, seed=0)
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import torch
from gradserve.text import EOS, text_tokens
from gradserve_store import store

from gradserve_worker.trainer import Checkpoint, load_checkpoint

log = logging.getLogger("gradserve.worker")

# A few recently used models are enough: requests come in bursts against the
# job someone is looking at, and a checkpoint loads in well under a second.
DEFAULT_CACHE_SIZE = 4
# The vocabulary's index of "<unk>", which unknown prefix tokens become.
UNK_INDEX = 0


def encode_prefix(prefix: str, checkpoint: Checkpoint) -> list[int]:
    """The prefix as token ids, split the way the job's text was (tokenization, preprocess, eos)."""
    config = checkpoint.config
    index = {token: i for i, token in enumerate(checkpoint.vocab)}
    tokens = text_tokens(prefix, config.tokenization, config.preprocess, config.eos)
    return [index.get(token, UNK_INDEX) for token in tokens]


def join_tokens(prefix: str, tokens: list[str], tokenization: str) -> str:
    """The prefix as given, followed by the generated tokens (words are separated by spaces, <eos> ends a line)."""
    if tokenization == "char":
        return prefix + "".join(tokens)
    out = prefix
    for token in tokens:
        if token == EOS:
            out += "\n"
        else:
            out += (" " if out and not out[-1].isspace() else "") + token
    return out


@torch.inference_mode()
def generate_text(checkpoint: Checkpoint, prefix: str, num_tokens: int, *, temperature: float = 0.0,
                  seed: int = 0) -> str:
    """`prefix` followed by `num_tokens` tokens from the model, as d2l's predict_ch8 does it.

    The hidden state starts at zero and warms up on the prefix in one forward
    pass; then each step feeds the last token and picks the next one: the
    likeliest (temperature 0), or a draw from softmax(logits / temperature)
    with a generator seeded by `seed`, so the same request gives the same text.
    A prefix with no tokens starts from a single <unk>, i.e. from no context.
    """
    model, vocab = checkpoint.model, checkpoint.vocab
    device = next(model.parameters()).device
    inputs = encode_prefix(prefix, checkpoint) or [UNK_INDEX]
    state = model.begin_state(1, device)
    logits, state = model(torch.tensor(inputs, device=device).view(-1, 1), state)
    generator = torch.Generator(device=device).manual_seed(seed)
    out: list[int] = []
    for i in range(num_tokens):
        last = logits[-1]
        if temperature == 0:
            token = int(last.argmax())
        else:
            probs = torch.softmax(last.float() / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        if i + 1 < num_tokens:
            logits, state = model(torch.tensor([[token]], device=device), state)
    return join_tokens(prefix, [vocab[t] for t in out], checkpoint.config.tokenization)


class ModelCache:
    """The most recently used checkpoints, opened, keyed by (job id, checkpoint step).

    A job that writes a new checkpoint gets a new key, so a running job is
    always served from its latest checkpoint and stale entries age out.
    """

    def __init__(self, size: int = DEFAULT_CACHE_SIZE):
        self.size = size
        self._entries: OrderedDict[tuple[str, int], Checkpoint] = OrderedDict()

    def get(self, job_store: store.JobStore, job_id: str, which: str = "latest") -> tuple[int, Checkpoint]:
        """(step, checkpoint) of the job's "latest" or "best" checkpoint, or the one at step `which`.

        Raises store.NotFound, or ValueError when it cannot be opened.
        """
        key = (job_id, job_store.checkpoint_step(job_id, which))
        if key in self._entries:
            self._entries.move_to_end(key)
            return key[1], self._entries[key]
        # The step read above may be stale by now; the step stored with the bytes is not.
        step, data = job_store.get_checkpoint(job_id, which)
        checkpoint = load_checkpoint(data, device="cpu")
        self._entries[(job_id, step)] = checkpoint
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)
        return step, checkpoint


class Generator:
    """Answers generate requests for one worker process: opens checkpoints, generates, replies."""

    def __init__(self, job_store: store.JobStore, cache_size: int = DEFAULT_CACHE_SIZE):
        self.store = job_store
        self.cache = ModelCache(cache_size)

    def answer(self, job_id: str, prefix: str, num_tokens: int, temperature: float, seed: int,
               checkpoint: str = "latest") -> dict:
        """The reply to one request: {"text", "step"} or {"error": {"code", "message"}}.

        The server validated the request; what can still go wrong here is the
        checkpoint, which may have gone or may not open.
        """
        try:
            step, opened = self.cache.get(self.store, job_id, checkpoint)
        except store.NotFound:
            return _error("NOT_FOUND", f"job {job_id} has no {_named(checkpoint)}; it may have been deleted")
        except ValueError as e:
            return _error("FAILED_PRECONDITION", f"the {_named(checkpoint)} of job {job_id} cannot be opened: {e}")
        try:
            text = generate_text(opened, prefix, num_tokens, temperature=temperature, seed=seed)
        except Exception as e:  # a bug here must still answer the caller, who is waiting
            log.exception("generating from %s failed", job_id)
            return _error("INTERNAL", f"generating from job {job_id} failed on the worker: {type(e).__name__}: {e}")
        return {"text": text, "step": step}

    def serve(self, request_id: str, **request) -> None:
        """Answer one request and push the reply where the server waits for it."""
        self.store.put_reply(request_id, self.answer(**request))


def _named(checkpoint: str) -> str:
    return f"{checkpoint} checkpoint" if checkpoint in ("latest", "best") else f"checkpoint at step {checkpoint}"


def _error(code: str, message: str) -> dict:
    return {"error": {"code": code, "message": message}}
