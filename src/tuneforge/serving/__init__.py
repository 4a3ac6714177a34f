"""Loading finished runs for generation, chat and (later) serving."""
