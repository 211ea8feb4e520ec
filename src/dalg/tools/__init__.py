"""Tools behind the entry points (src/model_table.py, src/visualize_attention.py): the model table and the
attention maps. They sit above models, data and lit (they build models by config name, preprocess images and read
checkpoints), so that dalg.models stays a package of nn.Modules; importable, unlike the scripts, so that tests,
benchmarks, the results browser and the W&B logger call the same functions."""
