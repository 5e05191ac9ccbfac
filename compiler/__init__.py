"""Compiler: model.yaml schema, checkpoint import, the model IR, the build pipeline, emitters."""
