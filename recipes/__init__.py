"""The recipes that ship with rlhfkit (YAML files in this folder): `rlhfkit recipes` lists
them, `rlhfkit recipes copy NAME DIR` writes one out, and a recipe may build on one with
`extends: [builtin:NAME]`."""
