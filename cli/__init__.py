"""The `qlora-kit` command line: thin click commands that parse, call qlora_kit, and print."""
