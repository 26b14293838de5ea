"""Training, export and evaluation of the embedded demo model (models/demo); never imported by the runtime."""
