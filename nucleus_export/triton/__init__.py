"""Triton Inference Server model repositories from a nucleus-export bundle.

One module per job: `names` (model names and Triton's naming rules), `pbtxt` (config.pbtxt as data and text),
`configs` (the three model configs from a bundle's manifest), `repository` (what goes where, atomic write, dry run),
`schema` (parse a config with Triton's own protobuf schema, when tritonclient is installed). The Python-backend
model itself lives on the runtime side (`nucleus_runtime.triton.model`)
and is copied into the repository as `nucleus_pipeline/1/model.py`.
"""
