"""Plain-PyTorch building blocks of MiniCPM-o 4.5; parameter names follow the official checkpoint."""
