"""Datasets a tenant can see and remove: ListDatasets and DeleteDataset against a real server (no worker)."""

from __future__ import annotations

import time

import pytest
import redis

import gradserve
from gradserve_server import auth
from gradserve_store import store

ALICE, BOB = "alice-token-0123456789abcdef", "bob-token-0123456789abcdef"
TEXT = "the time traveller smiled round at us\n" * 60
SMALL = dict(model="rnn", hidden_size=8, batch_size=4, num_steps=10, max_steps=5)


@pytest.fixture(scope="module")
def tenants(make_stack, tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"alice {auth.hash_token(ALICE)}\nbob {auth.hash_token(BOB)}\n")
    s = make_stack("datasets")
    s.start_redis()
    s.start_server("--tokens-file", str(tokens))
    return s


def test_a_tenant_lists_its_own_datasets_newest_first(tenants):
    with gradserve.Client(tenants.address, token=ALICE) as alice, gradserve.Client(tenants.address, token=BOB) as bob:
        started = time.time()
        first = alice.upload_bytes(TEXT, name="book")
        second = alice.upload_bytes("a different text, " * 40, name="notes")
        listed = alice.list_datasets()
        assert [d.id for d in listed][:2] == [second, first]
        book = next(d for d in listed if d.id == first)
        assert (book.name, book.size_bytes, book.num_chars, book.num_words, book.tenant) == (
            "book", len(TEXT), len(TEXT), 7 * 60, "alice")
        assert started - 1 <= book.uploaded_at.ToNanoseconds() / 1e9 <= time.time()
        assert first not in [d.id for d in bob.list_datasets()]


def test_a_dataset_in_use_is_refused_and_an_unused_one_goes(tenants):
    with gradserve.Client(tenants.address, token=ALICE) as alice:
        dataset = alice.upload_bytes(TEXT + "in use\n", name="in use")
        job = alice.submit(dataset=dataset, **SMALL)
        with pytest.raises(gradserve.FailedPrecondition) as err:
            alice.delete_dataset(dataset)
        assert job.id in str(err.value) and "gradserve cancel" in str(err.value)
        job.cancel()
        assert alice.delete_dataset(dataset).name == "in use"
        assert dataset not in [d.id for d in alice.list_datasets()]
        with pytest.raises(gradserve.NotFound, match="upload it first"):
            alice.submit(dataset=dataset, **SMALL)
        with pytest.raises(gradserve.NotFound, match="gradserve datasets"):
            alice.delete_dataset(dataset)
        with pytest.raises(gradserve.InvalidArgument, match="dataset_id must be a ds-... id"):
            alice.delete_dataset("book.txt")


def test_shared_text_stays_until_its_last_tenant_deletes_it(tenants):
    r = redis.Redis.from_url(tenants.redis_url)
    text = TEXT + "shared\n"
    with gradserve.Client(tenants.address, token=ALICE) as alice, gradserve.Client(tenants.address, token=BOB) as bob:
        dataset = alice.upload_bytes(text)
        assert bob.upload_bytes(text) == dataset
        alice.delete_dataset(dataset)
        assert r.exists(store.dataset_key(dataset)), "bob still has it"
        bob.submit(dataset=dataset, **SMALL).cancel()
        bob.delete_dataset(dataset)
        assert not r.exists(store.dataset_key(dataset))
    r.close()


def test_a_built_in_corpus_cannot_be_deleted(tenants):
    with gradserve.Client(tenants.address, token=ALICE) as alice:
        alice.submit(dataset="builtin:pydocs", **SMALL).cancel()
        r = redis.Redis.from_url(tenants.redis_url)
        builtin = r.get(store.builtin_key("builtin:pydocs")).decode()
        r.close()
        # Any tenant may train on it, but it is stored as the server's own.
        with pytest.raises(gradserve.NotFound):
            alice.delete_dataset(builtin)


def test_without_tenants_the_built_in_corpus_is_listed_but_kept(idle_stack):
    with idle_stack.client() as c:
        c.submit(dataset="builtin:pydocs", **SMALL).cancel()
        builtin = next(d for d in c.list_datasets() if d.name == "builtin:pydocs")
        with pytest.raises(gradserve.FailedPrecondition, match="built-in corpus builtin:pydocs"):
            c.delete_dataset(builtin.id)
