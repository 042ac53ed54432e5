"""Session tokens on SQLite and PostgreSQL: each refusal has its own code; racing redemptions, one winner."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from speechpipe.errors import Code, SpeechPipeError
from speechpipe.settings import Settings
from speechpipe.storage import AsyncStore, Store
from speechpipe.storage.credentials import new_token

RACERS = 50


@pytest.fixture
def pipe_id(store: Store) -> str:
    return store.create_pipe({"agent_id": "token-bot"}).id


@pytest.fixture
def key_id(store: Store) -> str:
    return store.create_api_key("token-tests").key.id


def refusal(store: Store, token: str, pipe_id: str) -> str:
    with pytest.raises(SpeechPipeError) as exc:
        store.redeem_token(token, pipe_id)
    return exc.value.code


def test_token_shape_hash_and_default_expiry(store: Store, pipe_id: str, key_id: str) -> None:
    minted = store.mint_token(pipe_id, api_key_id=key_id, metadata={"user_id": "u1"})
    assert minted.token.startswith("spt_") and len(minted.token) == 47  # 4 + 43 chars = 256 bits
    ttl = (minted.expires_at - datetime.now(UTC)).total_seconds()
    assert 55 < ttl <= 60
    with store.engine.connect() as conn:
        row = conn.execute(text("SELECT * FROM session_tokens WHERE pipe_id = :p"),
                           {"p": pipe_id}).mappings().one()
    assert row["token_hash"] == hashlib.sha256(minted.token.encode()).hexdigest()
    assert minted.token not in {str(v) for v in row.values()}  # only the hash is stored
    assert row["used_at"] is None
    grant = store.redeem_token(minted.token, pipe_id)
    assert (grant.pipe_id, grant.metadata, grant.api_key_id) == (pipe_id, {"user_id": "u1"}, key_id)


def test_ttl_comes_from_settings(db_url: str, pipe_id: str, tmp_path) -> None:
    settings = Settings.from_env({"SPEECHPIPE_TOKEN_TTL_S": "5", "SPEECHPIPE_DATA_DIR": str(tmp_path),
                                  "SPEECHPIPE_DATABASE_URL": db_url})
    store = Store.from_settings(settings)
    try:
        ttl = (store.mint_token(pipe_id).expires_at - datetime.now(UTC)).total_seconds()
        assert 3 < ttl <= 5
    finally:
        store.close()


def test_each_refusal_has_its_own_code(store: Store, pipe_id: str, key_id: str) -> None:
    other_pipe = store.create_pipe({"agent_id": "token-bot"}).id
    codes = {}

    for malformed in ("", "abc", "spt_short", "spk_" + "A" * 43, new_token() + "\n", new_token()[:-1] + "!",
                      " " + new_token()):
        assert refusal(store, malformed, pipe_id) == Code.TOKEN_MALFORMED
    codes["malformed"] = Code.TOKEN_MALFORMED

    codes["unknown"] = refusal(store, new_token(), pipe_id)

    expiring = store.mint_token(pipe_id, api_key_id=key_id, ttl_s=0.3)
    time.sleep(0.5)
    codes["expired"] = refusal(store, expiring.token, pipe_id)

    used = store.mint_token(pipe_id, api_key_id=key_id)
    store.redeem_token(used.token, pipe_id)
    codes["used"] = refusal(store, used.token, pipe_id)

    # A token for another pipe is refused AND left unused: the right pipe can still redeem it.
    elsewhere = store.mint_token(other_pipe, api_key_id=key_id)
    codes["wrong_pipe"] = refusal(store, elsewhere.token, pipe_id)
    assert store.redeem_token(elsewhere.token, other_pipe).pipe_id == other_pipe

    doomed_key = store.create_api_key("to-revoke").key.id
    minted_before_revoke = store.mint_token(pipe_id, api_key_id=doomed_key)
    store.revoke_api_key(doomed_key)
    codes["revoked"] = refusal(store, minted_before_revoke.token, pipe_id)

    assert codes == {"malformed": Code.TOKEN_MALFORMED, "unknown": Code.TOKEN_UNKNOWN,
                     "expired": Code.TOKEN_EXPIRED, "used": Code.TOKEN_USED,
                     "wrong_pipe": Code.TOKEN_WRONG_PIPE, "revoked": Code.API_KEY_REVOKED}
    assert len(set(codes.values())) == 6
    # Refused tokens stay unused in the table (expired / revoked ones were never consumed).
    with store.engine.connect() as conn:
        used_at = conn.execute(text("SELECT used_at FROM session_tokens WHERE token_hash = :h"), {
            "h": hashlib.sha256(minted_before_revoke.token.encode()).hexdigest()}).scalar_one()
    assert used_at is None


def test_token_of_a_deleted_pipe_is_refused(store: Store, key_id: str) -> None:
    pid = store.create_pipe({"agent_id": "token-bot"}).id
    minted = store.mint_token(pid, api_key_id=key_id)
    store.delete_pipe(pid)
    assert refusal(store, minted.token, pid) == Code.PIPE_NOT_FOUND


def _race_threads(store: Store, token: str, pipe_id: str, n: int) -> list[str]:
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt() -> None:
        barrier.wait()
        try:
            store.redeem_token(token, pipe_id)
            result = "won"
        except SpeechPipeError as exc:
            result = exc.code
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return outcomes


def test_50_threads_redeeming_one_token_yield_exactly_one_success(db_url: str, store: Store,
                                                                  pipe_id: str) -> None:
    # A store with a pool as large as the crowd: all 50 UPDATEs really are in flight at once.
    racing = Store(db_url, pool_size=RACERS, max_overflow=0)
    try:
        for _round in range(3):
            minted = store.mint_token(pipe_id)
            outcomes = _race_threads(racing, minted.token, pipe_id, RACERS)
            assert len(outcomes) == RACERS
            assert outcomes.count("won") == 1, outcomes
            assert outcomes.count(Code.TOKEN_USED) == RACERS - 1, outcomes
    finally:
        racing.close()


def test_wrong_pipe_racers_never_consume_the_token(store: Store, pipe_id: str) -> None:
    other = store.create_pipe({"agent_id": "token-bot"}).id
    minted = store.mint_token(pipe_id)
    wrong = _race_threads(store, minted.token, other, 20)
    assert wrong == [Code.TOKEN_WRONG_PIPE] * 20
    assert store.redeem_token(minted.token, pipe_id).pipe_id == pipe_id


async def test_50_concurrent_async_redemptions_yield_exactly_one_success(store: Store, pipe_id: str) -> None:
    astore = AsyncStore(store, max_workers=RACERS)
    try:
        minted = await astore.mint_token(pipe_id, metadata={"race": True})
        results = await asyncio.gather(*(astore.redeem_token(minted.token, pipe_id) for _ in range(RACERS)),
                                       return_exceptions=True)
        wins = [r for r in results if not isinstance(r, BaseException)]
        losses = [r for r in results if isinstance(r, BaseException)]
        assert len(wins) == 1 and wins[0].metadata == {"race": True}
        assert len(losses) == RACERS - 1
        assert all(isinstance(e, SpeechPipeError) and e.code == Code.TOKEN_USED for e in losses), losses
    finally:
        astore.close()
