"""An embedded karton stack, a restart loop and a leaking karton consumer."""
