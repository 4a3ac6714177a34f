"""Reading, normalising, rendering and packing training data."""
