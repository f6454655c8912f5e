"""kerasft studio: a gradio UI that writes configs and runs the `kerasft` command (see app.py)."""
