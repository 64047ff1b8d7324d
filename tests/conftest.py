"""Shared test set-up. Being here puts tests/ on sys.path (pytest's default import mode), so the test
modules import their helper modules (toy_experiment) by name, with no sys.path edits of their own."""
