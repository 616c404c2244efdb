"""Helpers the tests share (never imported by product code)."""
