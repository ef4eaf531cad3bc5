"""muse"""
