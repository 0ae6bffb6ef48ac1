"""Debitura's Referral Partner API, and what the vault does through it: fetch,
rotate (crash-safe), revoke and validate tokens (docs/design.md §9)."""
