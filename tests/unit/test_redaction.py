"""The redaction rules behind every log line and the operators' event copy."""

from __future__ import annotations

from receiver import redaction
from tests import helpers


def test_token_in_free_text_keeps_only_its_prefix() -> None:
    """A token inside a sentence is cut to its public prefix."""
    token = helpers.canary_token()
    masked = redaction.Redactor().text(f"failed for {token}, retrying")
    assert token not in masked
    assert token[:15] in masked


def test_jwt_bearer_and_configured_secrets_are_masked() -> None:
    """JWTs, Authorization values and configured secrets vanish from text."""
    jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.c2lnbmF0dXJlc2ln"
    text = f"auth=Bearer abc123def {jwt} key=s3cr3tValue99"
    masked = redaction.Redactor(["s3cr3tValue99"]).text(text)
    for secret in ("abc123def", jwt, "s3cr3tValue99"):
        assert secret not in masked


def test_values_under_secret_keys_are_masked_at_any_depth() -> None:
    """`password`, `webhook_secret`, `Authorization` … are masked however deep."""
    value = {"a": [{"b": {"webhook_secret": "x1", "Authorization": "x2", "token_prefix": "tok_l"}}]}
    masked = redaction.Redactor().value(value)
    inner = masked["a"][0]["b"]
    assert inner["webhook_secret"] == redaction.MASK
    assert inner["Authorization"] == redaction.MASK
    assert inner["token_prefix"] == "tok_l"


def test_short_token_shaped_value_is_masked_whole() -> None:
    """A token too short to keep a prefix safely is masked entirely."""
    assert redaction.Redactor().text("tok_test_abcdef12") == "tok_test_" + redaction.MASK


def test_whole_token_is_masked_whatever_its_alphabet() -> None:
    """Underscores and hyphens are part of a token (Debitura's `tok_live_new_token_456`):
    nothing of its secret part survives, not even a tail after an underscore."""
    for token in ("tok_live_new_token_456", "tok_test_a-b_c-d_e-f_g-h_ij-kl_mn"):
        masked = redaction.Redactor().text(f"rotated to {token}.")
        assert token[9:] not in masked
        assert "token_456" not in masked
        assert masked.endswith(".")


def test_a_bearer_credential_is_masked_in_any_case() -> None:
    """`Bearer`, `BEARER` and mixed case alike (the pattern reads any case; its quick
    pre-check once read only two)."""
    for word in ("Bearer", "BEARER", "bEaReR", "BeArEr", "bearer"):
        masked = redaction.Redactor().text(f"{word} abcdefSECRET99")
        assert "abcdefSECRET99" not in masked, word
