"""The model and the decode loop; knows nothing of HTTP."""
