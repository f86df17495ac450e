/* http: being written. */
