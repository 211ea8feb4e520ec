"""nn.Modules only: backbones, branches, fusions, margin heads and the composer that assembles them, plus the
weight loading they need. Nothing here imports dalg.data, dalg.lit, dalg.retrieval, Hydra or matplotlib
(tests/test_import_rules.py); models are built by name with dalg.create_model."""
