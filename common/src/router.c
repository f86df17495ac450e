/* router: being written. */
