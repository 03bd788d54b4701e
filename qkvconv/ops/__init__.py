"""What the commands do: convert, upgrade, merge, verify, inspect. Imports everything below; only the
CLI imports it."""
