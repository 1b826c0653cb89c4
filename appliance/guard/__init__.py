"""Safety policy: detectors and actions shared by the service and the eval scorers."""
