"""The admin console (Textual). The only package that imports textual."""
