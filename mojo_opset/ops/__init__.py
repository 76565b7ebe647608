"""Op interfaces and their torch reference implementations (the definition of correct)."""
