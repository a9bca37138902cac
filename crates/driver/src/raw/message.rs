//! Raw vhost-user messages: see the module docs of [`super`].
